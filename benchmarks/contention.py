"""Processes sharing one machine: how much slower each of two qradaptor processes runs beside the other than alone,
with every process taking every core (``--threads all``, PyTorch's own default and qradaptor's before) and with the
cores shared out (``--threads auto``, the default now: qradaptor.threads).

Three workloads, each a real ``qradaptor`` command on the embedded default (SmolLM2-135M + pydoc topics, compute
dtype ``auto``), each process in its own output directory and profile cache:

    profile   qradaptor profile, 1024 calibration tokens, 4 bits
    search    qradaptor search at 4bit, 2 trials + the warm start's anchors at full fidelity (a search worker's work:
              the same fine-tunes), blocks of 64 tokens, from one profile made beforehand
    run       qradaptor run at 4bit: profile, search, 12-step fine-tune, held-out loss, export

Modes: ``alone`` (one process), ``all`` (two identical processes started together, every core each) and ``auto``
(two together, each its share). Per process: wall time from start to exit, and its ratio to the same workload
alone (target: ≤ 2.2 with the default).

    .venv/bin/python benchmarks/contention.py            # 66 min on 2 cores (the every-core pairs are slow);
                                                         # nothing else may run meanwhile
    .venv/bin/python benchmarks/contention.py --smoke    # a tiny random model, 3 min (--only profile: 30 s)

Resumable (per-case results under --work, default benchmarks/work/contention). Writes
benchmarks/results/contention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402

TARGET = 2.2
MODES = {"alone": (1, "auto"), "all": (2, "all"), "auto": (2, "auto")}
FULL = {
    "profile": ["profile", "--tokens", "1024", "--bits", "4", "--seq-len", "128", "--no-cache"],
    "search": ["search", "--budget", "4bit", "--trials", "2", "--population", "2", "--promote", "0", "--refine", "0",
               "--seq-len", "64", "--sensitivity", "{sensitivity}"],
    "run": ["run", "--budget", "4bit", "--steps", "12", "--trials", "2", "--population", "2", "--promote", "0",
            "--refine", "0", "--profile-tokens", "512", "--seq-len", "64", "--eval-blocks", "8"],
}
SMOKE = {
    "profile": ["profile", "--tokens", "256", "--bits", "4", "--seq-len", "32", "--no-cache"],
    "search": ["search", "--budget", "4bit", "--trials", "2", "--population", "2", "--promote", "0", "--refine", "0",
               "--seq-len", "32", "--sensitivity", "{sensitivity}"],
    "run": ["run", "--budget", "4bit", "--steps", "4", "--trials", "2", "--population", "2", "--promote", "0",
            "--refine", "0", "--profile-tokens", "256", "--seq-len", "32", "--eval-blocks", "2"],
}


def qradaptor(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "qradaptor.cli", *args]


def process_env(work: Path, case: str, index: int, shared_models: Path, registry: Path) -> dict:
    """A process's own cache (profiles are not reused between processes) that shares the converted model, and the
    benchmark's own registry of processes (nothing else on the machine is counted)."""
    cache = work / "cache" / f"{case}-{index}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    if shared_models.is_dir():
        (cache / "models").symlink_to(shared_models, target_is_directory=True)
    return {**os.environ, "QRADAPTOR_CACHE": str(cache), "QRADAPTOR_RUNTIME_DIR": str(registry),
            "TQDM_DISABLE": "1"}


def measure(work: Path, workload: str, mode: str, command: list[str], common: list[str], shared_models: Path) -> dict:
    """Start the mode's processes together; each one's wall time from start to exit."""
    count, threads = MODES[mode]
    case = f"{workload}-{mode}"
    registry = work / "registry" / case
    shutil.rmtree(registry, ignore_errors=True)
    procs = []
    for i in range(count):
        out = work / "out" / f"{case}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        log = (work / "logs" / f"{case}-{i}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = qradaptor([*command, *common, "--threads", threads, "--out", str(out)])
        handle = log.open("w")
        procs.append((time.perf_counter(), subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT,
                                                            env=process_env(work, case, i, shared_models, registry)),
                      handle, log))
    seconds = []
    for started, proc, handle, log in procs:
        code = proc.wait()
        seconds.append(time.perf_counter() - started)
        handle.close()
        if code != 0:
            sys.exit(f"{case}: `{' '.join(proc.args)}` failed (exit {code}):\n{log.read_text()[-3000:]}")
    return {"workload": workload, "mode": mode, "processes": count, "threads": threads, "seconds": seconds,
            "load_before": os.getloadavg()[0]}


def report(results: list[dict], env: dict, smoke: bool) -> tuple[dict, str]:
    alone = {r["workload"]: r["seconds"][0] for r in results if r["mode"] == "alone"}
    rows, worst = [], {}
    for workload in dict.fromkeys(r["workload"] for r in results):
        row = [workload, f"{alone[workload]:.1f}"]
        for mode in ("all", "auto"):
            r = next(x for x in results if x["workload"] == workload and x["mode"] == mode)
            ratios = [s / alone[workload] for s in r["seconds"]]
            r["ratios"] = ratios
            worst[mode] = max(worst.get(mode, 0.0), *ratios)
            row += [" / ".join(f"{s:.1f}" for s in r["seconds"]), " / ".join(f"{q:.2f}×" for q in ratios)]
        rows.append(row)
    targets = {"worst_ratio_all": worst["all"], "worst_ratio_auto": worst["auto"], "target": TARGET,
               "met": worst["auto"] <= TARGET}
    model = "a tiny random model (smoke)" if smoke else "SmolLM2-135M"
    md = (f"# Two processes on one machine\n\n{model}; {describe_cpu(env)}; compute dtype `auto`. Each workload alone, "
          "then two identical processes started together: with every core each (`--threads all`: PyTorch's default, "
          "and qradaptor's before `--threads auto`) and with the cores shared out (`--threads auto`, the default). "
          "Seconds from start to exit per process, and the ratio to the same workload alone (target ≤ "
          f"{TARGET}× with the default).\n\n"
          + markdown_table(["workload", "alone s", "two, every core: s", "ratio", "two, shared (default): s", "ratio"],
                           rows)
          + f"\nWorst ratio: every core {worst['all']:.2f}×, shared {worst['auto']:.2f}× (target ≤ {TARGET}: "
          f"{'met' if targets['met'] else 'missed'}).\n\nWorkloads (`benchmarks/contention.py`): "
          + "; ".join(f"`qradaptor {' '.join(c)}`" for c in (SMOKE if smoke else FULL).values()) + ".\n")
    payload = {"smoke": smoke, "cases": results, "targets": targets, "environment": env}
    return payload, md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script, not the machine")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default benchmarks/work/contention)")
    parser.add_argument("--only", choices=tuple(FULL), default=None, help="measure one workload (results not written)")
    args = parser.parse_args(argv)
    work = args.work or Path(__file__).resolve().parent / "work" / ("contention-smoke" if args.smoke else "contention")
    work.mkdir(parents=True, exist_ok=True)
    workloads = SMOKE if args.smoke else FULL
    measured = [args.only] if args.only else list(workloads)
    common: list[str] = ["-q"]
    if args.smoke:
        from benchmarks.search import smoke_model

        model, data = smoke_model(Path(tempfile.mkdtemp(prefix="contention-", dir=work)))
        common += ["--model", model, "--data", data]
    from qradaptor.models import cache_dir, default_model_path

    shared_models = cache_dir() / "models"
    if not args.smoke:
        default_model_path()  # converted once, before any timing
    sensitivity = work / "sensitivity" / "sensitivity.json"
    if not sensitivity.is_file():  # the searches' profile (not timed)
        subprocess.run(qradaptor([*workloads["profile"], *common, "--out", str(sensitivity.parent)]), check=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    results = []
    for workload in measured:
        command = workloads[workload]
        command = [a.replace("{sensitivity}", str(sensitivity)) for a in command]
        for mode in MODES:
            path = work / "cases" / f"{workload}-{mode}.json"
            if not path.is_file():
                print(f"{workload}, {mode} ...", flush=True)
                from qradaptor.io import atomic_write_json

                atomic_write_json(path, measure(work, workload, mode, command, common, shared_models))
            results.append(json.loads(path.read_text()))
            print(f"{workload}, {mode}: {', '.join(f'{s:.1f} s' for s in results[-1]['seconds'])}", flush=True)
    payload, md = report(results, environment(), args.smoke)
    where = work if args.smoke or args.only else RESULTS
    write_results("contention-smoke" if args.smoke else "contention", payload, md, where)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
