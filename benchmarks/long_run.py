"""Does the 4-bit picture hold when training is not cut short? (issue #29 item 7)

The frontier's fine-tunes are 100 steps. This runs the rows its 4-bit target compares at 400 steps (one seed), the
same data, batch shape and learning rate otherwise, and sets them beside the same rows at the frontier's length:

    lora16          LoRA r16 on the bf16 base: the ceiling
    qlora4-r16      uniform 4-bit r16, PEFT's zero start: QLoRA as run today (the gap's other end)
    start           uniform 4-bit r16 with the adapter start `train` uses by default
    qradaptor-4bit  the search at the 4-bit budget, run as `qradaptor run` runs it for a 400-step fine-tune (its
                    trials on the first steps of the 400-step schedule), then its plan's final continuing the
                    search's run of it

Gap recovered = (qlora4-r16 − row) / (qlora4-r16 − lora16), at each length.

    .venv/bin/python benchmarks/long_run.py            # SmolLM2: ~70 min on 2 cores (the 100-step rows come from
                                                       # the ledger, benchmarks/results/finals.json)
    .venv/bin/python benchmarks/long_run.py --smoke    # a tiny random model, a minute or two

Resumable (the search in benchmarks/work/frontier/long-qradaptor-4bit-<steps>, finals in the frontier's store and
ledger). Writes benchmarks/results/long_run.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402
from benchmarks.frontier import REFERENCE, Bench, recipe, run_final, train_dtype  # noqa: E402

BUDGET = "4bit"
ROWS = ("lora16", REFERENCE, "start", f"qradaptor-{BUDGET}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="the long fine-tunes' steps (default 400; with "
                                                                "--smoke 4× the smoke frontier's)")
    parser.add_argument("--work", default=None, help="the frontier's working directory (default: "
                                                     "benchmarks/work/frontier; with --smoke a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    bench = Bench(args.work, smoke=args.smoke)
    short = dict(bench.settings)
    long_steps = args.steps or (4 * short["steps"] if args.smoke else 400)
    if long_steps <= short["steps"]:
        parser.error(f"--steps must be more than the frontier's {short['steps']}")
    from qradaptor.plan import Plan

    L, dtype = bench.shapes.num_layers, train_dtype()
    rows = []
    for steps in (short["steps"], long_steps):
        bench.settings = {**short, "steps": steps}  # the search and the finals run on this schedule
        searched = bench.search(f"qradaptor-{BUDGET}" if steps == short["steps"]
                                else f"long-qradaptor-{BUDGET}-{steps}", BUDGET)
        plans = {"lora16": (Plan.uniform(L, 16, 16), "bfloat16", None),
                 REFERENCE: (Plan.uniform(L, 4, 16), dtype, None),
                 "start": (Plan.uniform(L, 4, 16), dtype, None),
                 f"qradaptor-{BUDGET}": (searched.chosen.plan, dtype,
                                         str(searched.kept_run) if searched.kept_run else None)}
        for name in ROWS:
            plan, row_dtype, init_from = plans[name]
            settings = recipe(name, bench.settings)  # the reference starts at zero, every other row as `train` does
            final = run_final(bench.finals, name if steps == short["steps"] else f"{name} {steps} steps", plan,
                              settings, bench.model, bench.data, seed=0, dtype=row_dtype, init_from=init_from)
            rows.append({"name": name, "steps": steps, "plan": plan.describe(), "dtype": row_dtype,
                         "adapter_init": settings["adapter_init"], "loss": final["loss"],
                         "validation_loss": final.get("validation_loss"),
                         "final_train_loss": final.get("final_train_loss"), "memory_bytes": final["memory_bytes"],
                         "train_seconds": final["train_seconds"]})
            print(f"long_run: {name} at {steps} steps: {final['loss']:.4f} ({plan.describe()})", flush=True)
    bench.settings = short
    gaps = {}
    for steps in (short["steps"], long_steps):
        by = {r["name"]: r for r in rows if r["steps"] == steps}
        gap = by[REFERENCE]["loss"] - by["lora16"]["loss"]
        for name, r in by.items():
            r["gap_recovered"] = (by[REFERENCE]["loss"] - r["loss"]) / gap if gap > 0 else None
        gaps[str(steps)] = {"gap": gap, "qradaptor_recovered": by[f"qradaptor-{BUDGET}"]["gap_recovered"]}
    payload = {"settings": {**short, "long_steps": long_steps, "budget": BUDGET, "dtype": dtype, "smoke": args.smoke,
                            "model": bench.model or "smollm2-135m", "data": bench.data or "pydoc-topics"},
               "rows": rows, "gaps": gaps, "seconds": time.perf_counter() - began, "environment": environment()}
    md = report(rows, payload["settings"], args.smoke) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    write_results("long_run-smoke" if args.smoke else "long_run", payload, md, directory=directory)
    print(md)
    return 0


def report(rows: list[dict], settings: dict, smoke: bool) -> str:
    title = "a tiny random model (smoke)" if smoke else "SmolLM2-135M-Instruct"
    table = [[r["name"], r["steps"], r["plan"], r["adapter_init"], f"{r['loss']:.4f}",
              "" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f}%",
              f"{r['memory_bytes'] / 2**20:.1f}", f"{r['train_seconds']:.0f}"] for r in rows]
    return (f"# The {settings['budget']} comparison at {settings['steps']} and {settings['long_steps']} steps on "
            f"{title}\n\n"
            f"One seed (0), LoRA steps of {settings['batch_size']}×{settings['seq_len']} tokens at lr {settings['lr']}, "
            f"held-out loss on the whole test split. `{REFERENCE}`: uniform 4-bit r16 with PEFT's zero start (QLoRA "
            f"today); `start`: the same plan started as `train` starts adapters by default "
            f"(`{settings['adapter_init']}`); `qradaptor-{settings['budget']}`: the search run for a fine-tune of that "
            f"length, then its plan's final. Gap recovered = ({REFERENCE} − row) / ({REFERENCE} − lora16) at the "
            f"same length. Seconds: the final's training (a final continuing the search's run counts only the steps "
            f"it trains).\n\n"
            + markdown_table(["row", "steps", "plan", "start", "test loss", "gap recovered", "MiB", "s"], table)
            + "".join(f"\nAt {steps} steps the search chose `start`'s plan ({plan}): its final is the same fine-tune "
                      f"(one entry in the ledger).\n" for steps, plan in same_plan(rows)))


def same_plan(rows: list[dict]) -> list[tuple[int, str]]:
    """The lengths at which the search's plan is the uniform 4-bit r16 of the `start` row."""
    by = {(r["name"], r["steps"]): r for r in rows}
    return [(steps, by["start", steps]["plan"]) for (name, steps) in by
            if name == f"qradaptor-{BUDGET}" and by[name, steps]["plan"] == by["start", steps]["plan"]]


if __name__ == "__main__":
    sys.exit(main())
