"""Where the default `qradaptor run` spends its time (issue #29 target: on SmolLM2 it spends at most 25% of its
wall time profiling).

Runs ``qradaptor run --budget 4bit`` with every other setting at its default (SmolLM2-135M-Instruct, the default
data, a 4,096-token profile, the default search, a 200-step fine-tune) as a user would, in its own process with a
cache of its own (no profile is reused; the converted model is shared), and reads each stage's seconds from the
run's ``stages.json``. The run's wall time is measured from the process's start to its exit, so loading the model
counts as what it is: time that is none of the stages'.

    .venv/bin/python benchmarks/run_stages.py            # ~36 min on 2 cores
    .venv/bin/python benchmarks/run_stages.py --smoke    # a tiny random model, a minute
    .venv/bin/python benchmarks/run_stages.py --report   # rebuild the results from the run kept in --work
    .venv/bin/python benchmarks/run_stages.py --corpus code   # the same run on benchmarks/corpus.py's Python source
    .venv/bin/python benchmarks/run_stages.py --report --seeds 3  # and the chosen plan at seeds 1-2 (~20 min each)

A run is timed whole: an earlier attempt's run directory is deleted first. Besides the stages it reports what the
search cost beyond the final fine-tune, counting the steps the final continues from the search's kept run (issue #29
target: at most 0.5× the final fine-tune), in steps and in wall time. With ``--seeds N`` it also trains the plan
the run chose at seeds 1..N-1, with the run's final's settings from step 0 (seed 0 is the run's own final), and
reports the share of the gap from QLoRA as run today to LoRA r16 that it recovers, mean of the N seeds (issue #29
target: at least 50%), against recipe.py's rows at the same shape and seeds; every such fine-tune goes to the finals'
store and ledger, so one the ledger holds is not trained again. Writes
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
SEARCH_TARGET = 0.5  # the search's cost beyond what the final reuses, as a share of the final fine-tune, at most
GAP_TARGET = 0.5  # the share of the gap from QLoRA as run today to LoRA r16 that the run recovers, at least
STAGES = ("profile", "search", "train", "metrics", "export")


def results_name(corpus: str = "pydoc") -> str:
    """``run_stages`` (``run_stages-code`` on the second corpus), suffixed ``-float32`` on a CPU without native bf16
    (the run computes in float32 there; both machine kinds' results are kept)."""
    from benchmarks.frontier import train_dtype

    dtype = train_dtype()
    name = "run_stages" + ("-code" if corpus == "code" else "")
    return name if dtype == "bfloat16" else f"{name}-{dtype}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working directory (default: benchmarks/work/run_stages, "
                                                     "run_stages-code with --corpus code; with --smoke a temp dir)")
    parser.add_argument("--corpus", choices=("pydoc", "code"), default="pydoc",
                        help="the data: the default (pydoc topics) or benchmarks/corpus.py's Python source, given as "
                             "`--data`")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    parser.add_argument("--report", action="store_true", help="no rerun: rebuild the results from the finished run "
                                                              "kept in --work and the wall time its results recorded")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="the chosen plan's loss and gap recovered over seeds 0..N-1, training the seeds the "
                             "finals' ledger lacks (default: 1, the run alone; with --report, those recorded)")
    args = parser.parse_args(argv)
    if args.smoke and args.corpus != "pydoc":
        parser.error("--smoke trains on its own tiny data: leave out --corpus")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds: a positive count, not {args.seeds}")
    import tempfile

    work = Path(args.work or (tempfile.mkdtemp(prefix="qradaptor-bench-") if args.smoke
                              else Path(__file__).resolve().parent / "work"
                              / ("run_stages-code" if args.corpus == "code" else "run_stages")))
    work.mkdir(parents=True, exist_ok=True)
    command, source, model, data = ["run", "--budget", "4bit"], None, None, None
    if args.corpus == "code":
        from benchmarks.corpus import code_corpus_data

        data, source = code_corpus_data()
        command += ["--data", data]
    if args.smoke:
        from benchmarks.search import smoke_model

        model, data = smoke_model(work)
        command += ["--model", model, "--data", data, "--steps", "4", "--trials", "2", "--seq-len", "32",
                    "--profile-tokens", "64"]
    out, cache = work / "run", work / "cache"
    name = "run_stages-smoke" if args.smoke else results_name(args.corpus)
    directory = work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    seeds = args.seeds or 1
    if args.report:
        recorded = directory / f"{name}.json"
        if not (recorded.is_file() and (out / "stages.json").is_file()):
            sys.exit(f"run_stages --report: needs a finished run in {out} and its results {recorded}; "
                     "run without --report first")
        recorded = json.loads(recorded.read_text())  # the run's wall time and machine, not this one's
        payload = {**summarise(out, command, recorded["wall_seconds"], args.smoke),
                   "environment": recorded["environment"]}
        seeds = args.seeds or len((recorded.get("seeds") or {}).get("seeds", [0]))
    else:
        payload = summarise(out, command, timed_run(command, out, cache, work), args.smoke)
    payload["corpus_source"] = source
    if seeds > 1:
        payload["seeds"] = across_seeds(out, payload, seeds, model, data, work / "finals" if args.smoke else None)
    md = report(payload)
    write_results(name, payload, md, directory=directory)
    print(md)
    return 0


def timed_run(command: list[str], out: Path, cache: Path, work: Path) -> float:
    """Run ``qradaptor COMMAND`` whole, in its own process and cache; its wall time from start to exit."""
    from qradaptor.models import cache_dir

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
    return wall


def summarise(out: Path, command: list[str], wall: float, smoke: bool) -> dict:
    """The stages' seconds and shares, the search's cost and the run's outcome, read from its run directory."""
    stages = json.loads((out / "stages.json").read_text())["stages"]
    seconds = {stage: stages[stage]["seconds"] for stage in STAGES}
    metrics = json.loads((out / "metrics.json").read_text())
    share = {stage: s / wall for stage, s in seconds.items()}
    return {"command": f"qradaptor {' '.join(command)}", "smoke": smoke, "wall_seconds": wall,
            "stage_seconds": seconds, "outside_stages_seconds": wall - sum(seconds.values()), "share": share,
            "test_loss_after": metrics["test_loss_after"],
            "plan": json.loads((out / "search" / "plan.json").read_text()),
            "search": search_cost(out, seconds),
            "targets": {"profile_share_at_most": TARGET, "profile_share": share["profile"],
                        "met": share["profile"] <= TARGET},
            "environment": environment()}


def search_cost(out: Path, seconds: dict) -> dict:
    """What the search spent beyond the final fine-tune: its fine-tune steps less those the final continues from
    (the search's kept run of the chosen plan), as a share of the final's steps, and the same in wall time, where
    the reused steps are priced at the final's own pace (its evaluations and checkpoints included)."""
    from collections import Counter

    from qradaptor.plan import Plan
    from qradaptor.search import bit_widths_tried

    pareto = json.loads((out / "search" / "pareto.json").read_text())
    run = json.loads((out / "train" / "run.json").read_text())
    steps = run["config"]["steps"]
    reused = (run.get("initialised_from") or {}).get("step", 0)
    per_step = seconds["train"] / max(steps - reused, 1)
    in_steps = (pareto["fine_tune_steps"] - reused) / steps
    in_seconds = (seconds["search"] - reused * per_step) / (steps * per_step)
    return {"evaluations": dict(Counter(point["fidelity"] for point in pareto["points"])),
            "fine_tune_steps": pareto["fine_tune_steps"], "reused_steps": reused, "final_steps": steps,
            "final_seconds_per_step": per_step, "cost_in_steps": in_steps, "cost_in_seconds": in_seconds,
            # what its trials spend besides fine-tune steps (building, quantizing, starting, evaluating, saving)
            "beyond_steps_seconds": seconds["search"] - pareto["fine_tune_steps"] * per_step,
            # each quantized, and its starts fitted, once: the search's one-time costs (results/trial_cost.md)
            "bit_widths": bit_widths_tried([Plan.from_dict(point["plan"]) for point in pareto["points"]]),
            "layers": len(pareto["chosen"]["plan"]["layers"]),
            "at_most": SEARCH_TARGET, "met_in_steps": in_steps <= SEARCH_TARGET,
            "met_in_seconds": in_seconds <= SEARCH_TARGET}


def across_seeds(out: Path, summary: dict, seeds: int, model, data, store: Path | None) -> dict:
    """The chosen plan's held-out loss at seeds 0..``seeds``-1 (seed 0: the run's own final, from its ``summary``,
    `summarise`'s; the others the same fine-tune, with the settings its run.json records, from step 0 at that seed)
    beside recipe.py's QLoRA (uniform 4-bit r16, zero start) and LoRA r16 at the same shape and seeds, and the share
    of the gap between them that the plan's mean closes. The fine-tunes come from the finals' ``store`` (default:
    the shared one, and its committed ledger) or are trained there."""
    from benchmarks import frontier
    from qradaptor.plan import Plan

    if store is not None:  # a smoke run's tiny fine-tunes: in this process, in its own store
        frontier.children_in_process()
    plan = Plan.from_dict(summary["plan"])
    run = json.loads((out / "train" / "run.json").read_text())
    config, dtype = run["config"], run["dtype_choice"]["dtype"]  # the dtype it trained in, not "auto"
    settings = {k: config[k] for k in ("steps", "seq_len", "batch_size", "lr", "warmup_steps", "adapter_init")}
    rows = {"run": plan, frontier.REFERENCE: Plan.uniform(plan.num_layers, 4, 16),
            "lora16": Plan.uniform(plan.num_layers, 16, 16)}
    losses = {name: [] for name in rows}
    for seed in range(seeds):
        for name, row_plan in rows.items():
            if name == "run" and seed == 0:
                losses[name].append(summary["test_loss_after"])
                continue
            final = frontier.run_final(store or frontier.FINALS, f"run_stages {name} seed {seed}", row_plan,
                                       frontier.recipe(name, settings), model, data, seed=seed, dtype=dtype)
            print(f"run_stages: {name} seed {seed}: {final['loss']:.4f}", flush=True)
            losses[name].append(final["loss"])
    mean = {name: sum(values) / len(values) for name, values in losses.items()}
    gap = frontier.gap_recovered(mean[frontier.REFERENCE], mean["run"], mean["lora16"])
    return {"seeds": list(range(seeds)), "settings": {**settings, "dtype": dtype}, "losses": losses,
            "mean": mean, "spread": {name: max(v) - min(v) for name, v in losses.items()}, "gap_recovered": gap,
            "gap_at_least": GAP_TARGET, "met": gap is not None and gap >= GAP_TARGET}


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
    title = " (smoke: a tiny random model)" if p["smoke"] else ""
    if p.get("corpus_source"):
        title = " on the second corpus (Python source)"
    return (f"# Where the default run spends its time{title}\n\n"
            f"`{p['command']}` with every other setting at its default, in its own process with a cache of its own "
            f"(no profile reused), each stage's seconds from its `stages.json`; the run's wall time from the "
            f"process's start to its exit. The search chose {plan}; held-out (test) loss after training: "
            f"{p['test_loss_after']:.4f}.\n\n"
            + markdown_table(["stage", "seconds", "of the run"], rows)
            + f"\nTarget: the profile takes at most {t['profile_share_at_most']:.0%} of the run: "
              f"{t['profile_share']:.1%}, {verdict}.\n\n"
              + search_line(p["search"]) + (seeds_line(p["seeds"]) if p.get("seeds") else "")
            + f"CPU: {describe_cpu(p['environment'])}.\n")


def search_line(c: dict) -> str:
    from qradaptor.search import describe_bit_widths

    evaluations = ", ".join(f"{n} {fidelity}" for fidelity, n in c["evaluations"].items())
    verdicts = [f"{c[key]:.2f}× in {unit}" + ("" if c[f"met_in_{unit}"] else
                                              f" (MISSED by {c[key] - c['at_most']:.2f}×)")
                for key, unit in (("cost_in_steps", "steps"), ("cost_in_seconds", "seconds"))]
    return (f"Search cost: {sum(c['evaluations'].values())} evaluations ({evaluations}), {c['fine_tune_steps']} "
            f"fine-tune steps, of which the final continues {c['reused_steps']}; beyond them it cost "
            f"{verdicts[0]} and {verdicts[1]} of the {c['final_steps']}-step final fine-tune (its steps priced at "
            f"the final's pace, {c['final_seconds_per_step']:.2f} s/step). Target: at most {c['at_most']:.1f}×. "
            f"Its trials spent {c['beyond_steps_seconds']:.0f} s besides fine-tune steps at that pace (building "
            f"and quantizing each plan's model, fitting the adapter starts not fitted yet — the warm start's up front, "
            f"in one calibration forward —, evaluating, saving "
            f"its run), and its plans stored {describe_bit_widths(c['bit_widths'], c['layers'])} (each linear "
            f"quantized, and its adapter start fitted, once per width).\n\n")


def seeds_line(s: dict) -> str:
    from benchmarks.frontier import REFERENCE
    from benchmarks.learning_rate import percent

    seeds = f"seeds {', '.join(map(str, s['seeds']))}"
    rows = "; ".join(f"{label} {', '.join(f'{v:.4f}' for v in s['losses'][name])} → **{s['mean'][name]:.4f} ± "
                     f"{s['spread'][name] / 2:.4f}**"
                     for name, label in (("run", "the chosen plan"), (REFERENCE, "QLoRA as run today (uniform 4-bit "
                                                                                 "r16, zero start)"),
                                         ("lora16", "LoRA r16 on the unquantized base")))
    gap = s["gap_recovered"]
    verdict = ("" if gap is None else "met" if s["met"] else f"MISSED by {s['gap_at_least'] - gap:.0%}")
    return (f"Across {seeds} (held-out test loss; seed 0 of the chosen plan is this run's own final, the others the "
            f"same fine-tune at another seed; mean ± half the spread): {rows}. The run recovers "
            f"**{percent(gap) or 'nothing (no gap)'}** of the gap from QLoRA to LoRA r16, mean of {len(s['seeds'])} "
            f"seeds. Target: at least {s['gap_at_least']:.0%}" + (f": {verdict}" if verdict else "") + ".\n\n")


if __name__ == "__main__":
    sys.exit(main())
