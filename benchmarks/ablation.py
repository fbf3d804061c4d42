"""Ablation at the 4-bit budget (issue #29 item 5): what each lever buys alone, and all of them together.

The levers, each switched on alone against QLoRA as a user runs it today (uniform 4-bit HQQ + LoRA r16, PEFT's zero
start: the frontier's ``qlora4-r16``), then together:

    qlora4-r16       uniform 4-bit r16, zero start                              (no lever)
    start            uniform 4-bit r16, the adapter start `train` uses by default (adapter_init)
    balanced         uniform 4-bit r16, the ``balanced`` start (the same fit, A at PEFT's initial scale)
    dora             uniform 4-bit r16, DoRA adapters, zero start               (QDoRA as run today)
    search           the search's plan within the budget, zero start            (bits and ranks per layer)
    search+module    the same with a bits and rank choice per linear            (``--genes module``)
    search+groups    the same per layer, choosing group sizes too               (``--group-sizes 32,64,128``)
    search+start     the search with the default start: what `qradaptor run` does (the frontier's own search)
    all              the search per linear with group sizes, DoRA, the default start
    lora16           LoRA r16 on the unquantized base, zero start               (the ceiling: 16-bit LoRA)

Gap recovered = (qlora4-r16 − row) / (qlora4-r16 − lora16): the share of the gap from QLoRA as run today to 16-bit
LoRA that the row closes (issue #29's target: ≥ 50% for the default `run`, i.e. ``search+start``).

Each search runs as benchmarks/frontier.py runs its ``qradaptor-4bit`` (its settings: cheap trials, promotion, one
refinement, on the first steps of the final fine-tune's schedule, in its dtype), its fine-tunes started as its row
says; every row's plan is then fine-tuned with 3 seeds (seed 0 continuing the search's run of it) and measured on
the whole test split. A DoRA row's budget is priced with DoRA's magnitudes (as `--budget 4bit --dora` prices it).
Finals go to the frontier's store and ledger (benchmarks/work/finals, results/finals.json): the rows the frontier
or benchmarks/genes.py already trained are not trained again.

    .venv/bin/python benchmarks/ablation.py            # SmolLM2: ~1.5 h on 2 cores beyond what the ledger holds
    .venv/bin/python benchmarks/ablation.py --lr 3e-3  # at the best rate measured (results/learning_rate.md)
    .venv/bin/python benchmarks/ablation.py --rows qlora4-r16,lora16,start,search+start   # some rows only
    .venv/bin/python benchmarks/ablation.py --lr 3e-3 --warmup 20 --rows qlora4-r16,start,lora16  # another warm-up
    .venv/bin/python benchmarks/ablation.py --smoke    # a tiny random model, a few minutes

The recipe's learning rate (3e-4, the frontier's) under-trains every row in 100 steps and flatters the start
(results/learning_rate.md): ``--lr`` runs every row, and every search's fine-tunes, at another rate (its searches in
benchmarks/work/frontier-lr<lr>). Resumable (searches in benchmarks/work/frontier/ablation-*, finals in the store).
Writes benchmarks/results/ablation.{json,md}, ablation-lr<lr>.{json,md} at another rate than the recipe's.
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
from benchmarks.frontier import FULL, REFERENCE, Bench, gap_recovered, train_dtype  # noqa: E402
from benchmarks.genes import GROUP_SIZES, own_choices, own_groups  # noqa: E402

BUDGET = "4bit"
#: row → (how its plan is made: "uniform" or the search's extra settings, its start: "default" (`train`'s) or an
#: ``--adapter-init`` value, DoRA)
ROWS = {
    REFERENCE: ("uniform", "zero", False),
    "start": ("uniform", "default", False),
    "balanced": ("uniform", "balanced", False),
    "dora": ("uniform", "zero", True),
    "search": ({}, "zero", False),
    "search+module": ({"genes": "module"}, "zero", False),
    "search+groups": ({"group_sizes": GROUP_SIZES}, "zero", False),
    "search+start": ({}, "default", False),
    "all": ({"genes": "module", "group_sizes": GROUP_SIZES}, "default", True),
    "lora16": ("unquantized", "zero", False),
}
CEILING = "lora16"


def step_windows(steps: int) -> list[tuple[int, int]]:
    """Step ranges (first, last), 1-based, that double in length: 1–4, 5–8, 9–16, 17–32, 33–64, 65–100 at 100 steps.
    Where a prefix of the schedule ranks plans as the whole run does shows in them (the searches rank on a prefix)."""
    ends = sorted({max(1, round(steps * f)) for f in (0.04, 0.08, 0.16, 0.32, 0.64)} | {steps})
    return [(lo + 1, hi) for lo, hi in zip([0] + ends[:-1], ends)]


def window_means(curves: list, steps: int) -> list[float] | None:
    """Mean training loss in each of `step_windows`, over the seeds' curves; None when a seed's curve is missing."""
    if not curves or any(c is None or len(c) != steps for c in curves):
        return None
    return [sum(sum(c[lo - 1:hi]) / (hi - lo + 1) for c in curves) / len(curves) for lo, hi in step_windows(steps)]


def search_name(row: str) -> str:
    """The frontier's own search for the default `run` (reused where the frontier made it), else its own."""
    return f"qradaptor-{BUDGET}" if row == "search+start" else f"ablation-{row.replace('+', '-')}-{BUDGET}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="the frontier's working directory (default: "
                                                     "benchmarks/work/frontier; with --smoke a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"every row's learning rate, its searches' too (default: the recipe's, {FULL['lr']:g})")
    parser.add_argument("--warmup", type=int, default=None,
                        help="the final fine-tunes' warm-up steps (default: the recipe's, `train`'s "
                             "--warmup-steps); uniform rows only: a search's fine-tunes keep the recipe's")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="the rows to run, comma-separated, in the table's order (default: all of them)")
    args = parser.parse_args(argv)
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(ROWS))
    if unknown or not chosen:
        parser.error(f"--rows: unknown {', '.join(unknown) or '(none given)'}; the rows are {', '.join(ROWS)}")
    searched_rows = [r for r in chosen if _searched(ROWS[r][0])]
    if args.warmup is not None and (args.warmup < 0 or searched_rows):
        parser.error(f"--warmup: a count of steps, for uniform rows only (not {', '.join(searched_rows)})"
                     if searched_rows else "--warmup: a count of steps, 0 or more")
    start = time.perf_counter()
    bench = Bench(args.work, smoke=args.smoke, lr=args.lr)
    settings, dtype = bench.settings, train_dtype()
    if args.warmup is not None:
        settings = {**settings, "warmup_steps": args.warmup}
    default_start = settings["adapter_init"]

    rows = []
    for name, (source, start_as, dora) in ROWS.items():
        if name not in chosen:
            continue
        adapter_init = default_start if start_as == "default" else start_as
        recipe = {**settings, "adapter_init": adapter_init}
        searched = _searched(source)
        if not searched:
            from qradaptor.plan import Plan

            bits = 16 if source == "unquantized" else 4
            plan, result, cost = Plan.uniform(bench.shapes.num_layers, bits, 16, dora=dora), None, {}
        else:
            extra = {**source, "adapter_init": adapter_init}
            if dora:
                extra["dora"] = True
            if extra.get("genes", "layer") != "layer":  # made (once) only where a row searches per linear
                extra["sensitivity"] = bench.search_profile(modules=True)
            result = bench.search(search_name(name), BUDGET, **extra)
            plan, cost = result.chosen.plan, bench.search_cost(search_name(name), result)
        finals = bench.final_seeds(f"ablation {name}", plan, recipe, dtype=dtype, search=result)
        seeds, seconds, memory = finals["seeds"], finals["train_seconds"], finals["memory_bytes"]
        if searched:
            assert memory <= result.budget_bytes, f"{name}: {memory} bytes over the budget {result.budget_bytes}"
        rows.append({"name": name, "adapter_init": adapter_init, "dora": dora,
                     "searched": searched, "genes": source.get("genes", "layer") if searched else None,
                     "group_sizes": list(source.get("group_sizes", ())) if searched else [],
                     "plan": plan.describe(), "plan_layers": plan.to_dict()["layers"],
                     "linears_with_their_own_choice": own_choices(plan),
                     "linears_with_their_own_group": own_groups(plan, bench.shapes),
                     "memory_bytes": memory, "budget_bytes": result.budget_bytes if searched else None,
                     "seeds": seeds, "loss": sum(seeds) / len(seeds), "loss_spread": max(seeds) - min(seeds),
                     "search_loss": result.chosen.loss if searched else None, "train_seconds": seconds,
                     "train_loss_by_window": window_means(finals["train_losses"], settings["steps"]), **cost})
        print(f"ablation: {name}: {rows[-1]['loss']:.4f} ({plan.describe()})", flush=True)

    by = {r["name"]: r for r in rows}
    reference, ceiling = by.get(REFERENCE), by.get(CEILING)
    for r in rows:
        r["delta_vs_reference"] = r["loss"] - reference["loss"] if reference else None
        r["beyond_spread"] = (reference is not None and abs(r["delta_vs_reference"]) >
                              max(r["loss_spread"], reference["loss_spread"]))
        r["gap_recovered"] = (gap_recovered(reference["loss"], r["loss"], ceiling["loss"])
                              if reference and ceiling else None)
    results_name = "ablation" + (f"-lr{settings['lr']:g}" if settings["lr"] != FULL["lr"] and not args.smoke else "")
    results_name += f"-warmup{args.warmup}" if args.warmup is not None and not args.smoke else ""
    payload = {"settings": {**settings, "budget": BUDGET, "dtype": dtype, "smoke": args.smoke,
                            "group_sizes": list(GROUP_SIZES),
                            "model": bench.model or "smollm2-135m", "data": bench.data or "pydoc-topics"},
               "rows": rows, "seconds": time.perf_counter() - start, "environment": environment()}
    md = report(rows, settings, args.smoke) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    write_results("ablation-smoke" if args.smoke else results_name, payload, md, directory=directory)
    print(md)
    return 0


def _searched(source) -> bool:
    """A row's plan comes from a search (its source is the search's settings), not a uniform plan."""
    return source not in ("uniform", "unquantized")


def report(rows: list[dict], settings: dict, smoke: bool) -> str:
    from qradaptor.search import search_rate

    title = "a tiny random model (smoke)" if smoke else "SmolLM2-135M-Instruct"
    steps, rate = settings["steps"], search_rate(settings["lr"])
    table = [[r["name"], "search" if r["searched"] else f"uniform {r['plan'].split('b', 1)[0]}b r16", r["adapter_init"],
              "DoRA" if r["dora"] else "LoRA",
              r["genes"] or "", ",".join(map(str, r["group_sizes"])) or "64",
              f"{r['loss']:.4f} ± {r['loss_spread'] / 2:.4f}",
              "" if r["delta_vs_reference"] is None else
              f"{r['delta_vs_reference']:+.4f}" + (" (beyond the seed spreads)" if r["beyond_spread"] else ""),
              "" if r["gap_recovered"] is None else f"{r['gap_recovered']:.0%}",
              f"{r['memory_bytes'] / 2**20:.1f}",
              f"{(r['search_steps'] - r['search_steps_reused']) / steps:.2f}" if r["searched"] else "",
              r["linears_with_their_own_choice"], r["linears_with_their_own_group"], r["plan"]] for r in rows]
    md = (f"# Ablation at the {BUDGET} budget on {title}\n\n"
          f"Each lever alone against `{REFERENCE}` (uniform 4-bit r16, PEFT's zero start: QLoRA as run today), then "
          f"all together. Searches run as benchmarks/frontier.py runs its `qradaptor-{BUDGET}` "
          f"({settings['search']['cheap']['steps']}-step cheap trials, promotion and refinement at "
          f"{settings['search']['full']['steps']} steps on the first steps of the final fine-tune's schedule, at lr "
          f"{rate:g}), their "
          f"fine-tunes started as the row's final is. Final fine-tunes: {steps} LoRA steps of "
          f"{settings['batch_size']}×{settings['seq_len']} tokens (lr {settings['lr']}"
          + (f", {settings['warmup_steps']} warm-up steps" if "warmup_steps" in settings else "")
          + f"), mean of {settings['seeds']} "
          f"seeds (± half the max–min spread), held-out loss on the whole test split; beyond the seed spreads when "
          f"the difference is larger than both rows' max–min spreads. × final: search steps the final fine-tune does "
          f"not reuse, per final fine-tune. own choice / own group: linears whose bits or rank differ from their "
          f"layer's / whose group size is not 64. A DoRA row's budget is priced with DoRA's magnitudes. `{CEILING}`: "
          f"LoRA r16 on the unquantized base (16-bit LoRA); gap recovered = ({REFERENCE} − row) / ({REFERENCE} − "
          f"{CEILING}).\n\n")
    missing = [r for r in ROWS if r not in {row["name"] for row in rows}]
    if missing:
        md += f"Rows not run here: {', '.join(missing)}.\n\n"
    md += markdown_table(["row", "plan", "start", "adapter", "genes", "group sizes", "test loss", f"Δ vs {REFERENCE}",
                          "gap recovered",
                          "MiB", "× final", "own choice", "own group", "plan chosen"], table)
    windows = step_windows(steps)
    curves = [r for r in rows if r.get("train_loss_by_window")]
    if curves:
        md += (f"\nTraining loss by step window, mean over the seeds (each seed sees the same batches in every row): "
               f"the searches rank plans on the first {settings['search']['full']['steps']} steps of this schedule.\n\n")
        md += markdown_table(["row"] + [f"steps {lo}–{hi}" for lo, hi in windows],
                             [[r["name"]] + [f"{v:.3f}" for v in r["train_loss_by_window"]] for r in curves])
    return md


if __name__ == "__main__":
    sys.exit(main())
