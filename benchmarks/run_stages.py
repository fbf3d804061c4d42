"""Where the default `qradaptor run` spends its time (issue #29 target: on SmolLM2 it spends at most 25% of its
wall time profiling).

Runs ``qradaptor run --budget 4bit`` with every other setting at its default (SmolLM2-135M-Instruct, the default
data, a 4,096-token profile, the default search, a 200-step fine-tune) as a user would, in its own process with a
cache of its own (no profile is reused; the converted model is shared), and reads each stage's seconds from the
run's ``stages.json``. The run's wall time is measured from the process's start to its exit, so loading the model
counts as what it is: time that is none of the stages'.

    .venv/bin/python benchmarks/run_stages.py            # ~36 min on 2 cores
    .venv/bin/python benchmarks/run_stages.py --smoke    # a tiny random model, a minute

A run is timed whole: an earlier attempt's run directory is deleted first. Writes
benchmarks/results/run_stages.{json,md} (run_stages-float32.* on a CPU without native bf16, where `run` computes
in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402

TARGET = 0.25  # the profile's share of the run's wall time, at most
STAGES = ("profile", "search", "train", "metrics", "export")


def results_name() -> str:
    """``run_stages``, or ``run_stages-float32`` on a CPU without native bf16 (the run computes in float32 there; both
    machine kinds' results are kept)."""
    from benchmarks.frontier import train_dtype

    dtype = train_dtype()
    return "run_stages" if dtype == "bfloat16" else f"run_stages-{dtype}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working directory (default: benchmarks/work/run_stages; with "
                                                     "--smoke a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    args = parser.parse_args(argv)
    import tempfile

    from qradaptor.models import cache_dir

    work = Path(args.work or (tempfile.mkdtemp(prefix="qradaptor-bench-") if args.smoke
                              else Path(__file__).resolve().parent / "work" / "run_stages"))
    work.mkdir(parents=True, exist_ok=True)
    command = ["run", "--budget", "4bit"]
    if args.smoke:
        from benchmarks.search import smoke_model

        model, words = smoke_model(work)
        command += ["--model", model, "--data", words, "--steps", "4", "--trials", "2", "--seq-len", "32",
                    "--profile-tokens", "64"]
    out, cache = work / "run", work / "cache"
    for path in (out, cache):  # timed whole: nothing from an earlier attempt
        shutil.rmtree(path, ignore_errors=True)
    cache.mkdir(parents=True)
    shared = cache_dir() / "models"  # the converted model (loading it is not what is measured), no profile
    if shared.is_dir():
        (cache / "models").symlink_to(shared.resolve(), target_is_directory=True)
    env = {**os.environ, "QRADAPTOR_CACHE": str(cache), "TQDM_DISABLE": "1"}
    log = work / "run.log"
    argv_run = [sys.executable, "-m", "qradaptor.cli", *command, "--out", str(out)]
    print(f"run_stages: {' '.join(argv_run[2:])}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(argv_run, stdout=handle, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"run_stages: `qradaptor {' '.join(command)}` failed (exit {code}):\n{log.read_text()[-3000:]}")
    stages = json.loads((out / "stages.json").read_text())["stages"]
    seconds = {stage: stages[stage]["seconds"] for stage in STAGES}
    metrics = json.loads((out / "metrics.json").read_text())
    share = {stage: s / wall for stage, s in seconds.items()}
    payload = {"command": f"qradaptor {' '.join(command)}", "smoke": args.smoke, "wall_seconds": wall,
               "stage_seconds": seconds, "outside_stages_seconds": wall - sum(seconds.values()), "share": share,
               "test_loss_after": metrics["test_loss_after"], "plan": json.loads((out / "search" / "plan.json")
                                                                                .read_text()),
               "targets": {"profile_share_at_most": TARGET, "profile_share": share["profile"],
                           "met": share["profile"] <= TARGET},
               "environment": environment()}
    md = report(payload)
    directory = work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    write_results("run_stages-smoke" if args.smoke else results_name(), payload, md, directory=directory)
    print(md)
    return 0


def report(p: dict) -> str:
    wall = p["wall_seconds"]
    rows = [[stage, f"{s:.0f}", f"{s / wall:.1%}"] for stage, s in p["stage_seconds"].items()]
    rows.append(["outside the stages (start-up, loading the model)", f"{p['outside_stages_seconds']:.0f}",
                 f"{p['outside_stages_seconds'] / wall:.1%}"])
    rows.append(["**the run**", f"**{wall:.0f}**", "100%"])
    t = p["targets"]
    from qradaptor.plan import Plan

    plan = f"`{Plan.from_dict(p['plan']).describe()}`"
    verdict = ("met" if t["met"] else f"MISSED by {t['profile_share'] - t['profile_share_at_most']:.1%} of the run "
               f"({t['profile_share'] / t['profile_share_at_most']:.2f}× the allowance)")
    return (f"# Where the default run spends its time{' (smoke: a tiny random model)' if p['smoke'] else ''}\n\n"
            f"`{p['command']}` with every other setting at its default, in its own process with a cache of its own "
            f"(no profile reused), each stage's seconds from its `stages.json`; the run's wall time from the "
            f"process's start to its exit. The search chose {plan}; held-out (test) loss after training: "
            f"{p['test_loss_after']:.4f}.\n\n"
            + markdown_table(["stage", "seconds", "of the run"], rows)
            + f"\nTarget: the profile takes at most {t['profile_share_at_most']:.0%} of the run: "
              f"{t['profile_share']:.1%}, {verdict}.\n\nCPU: {describe_cpu(p['environment'])}.\n")


if __name__ == "__main__":
    sys.exit(main())
