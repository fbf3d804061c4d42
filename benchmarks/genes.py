"""Gene layouts (issue #29 items 1 and 2): does the search end better when each choice of bits and rank is for a
block of a layer (``--genes groups``: attention, MLP) or for each linear (``--genes module``) than for a whole layer,
and when each unit chooses its quantization group size too (``--group-sizes 32,64,128``: the ``layer-g`` and
``module-g`` rows)?

Per budget and layout: the search exactly as benchmarks/frontier.py runs its ``qradaptor-<budget>`` searches (its
settings: 8 cheap trials, promotion, one refinement, on the first steps of the final fine-tune's schedule in its
dtype, adapters started as `train` starts them), the finer layouts reading a profile with per-linear estimates (what
``qradaptor run --genes`` profiles); then the chosen plan's final fine-tune at every seed (seed 0 continuing the
search's run), held-out loss on the whole test split. The ``layer`` rows are the frontier's own searches and finals
(reused when the frontier made them). Finals go to the frontier's store and ledger (benchmarks/work/finals,
results/finals.json), so nothing is trained twice.

    .venv/bin/python benchmarks/genes.py                    # 4-bit budget: ~40 min on 2 cores beyond the frontier's
    .venv/bin/python benchmarks/genes.py --budgets 3.5bit,4bit
    .venv/bin/python benchmarks/genes.py --layouts layer,layer-g,module-g   # some rows (the others are kept)
    .venv/bin/python benchmarks/genes.py --smoke            # a tiny random model, a few minutes

Resumable (searches in benchmarks/work/frontier/genes-*, finals in the store). Writes benchmarks/results/genes.{json,md}.
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
from benchmarks.frontier import Bench, train_dtype  # noqa: E402

GROUP_SIZES = (32, 64, 128)
#: row → the search's genes and group sizes (none: every linear at 64)
LAYOUTS = {"layer": ("layer", ()), "groups": ("groups", ()), "module": ("module", ()),
           "layer-g": ("layer", GROUP_SIZES), "module-g": ("module", GROUP_SIZES)}


def search_name(layout: str, budget: str) -> str:
    """The frontier's own search for per-layer genes; ``genes-<layout>-<budget>`` for the others."""
    return f"qradaptor-{budget}" if layout == "layer" else f"genes-{layout}-{budget}"


def own_groups(plan, shapes) -> int:
    """How many of the model's decoder linears the plan quantizes at a group size other than the plan's."""
    return sum(plan.group_size_of(l, s.name) != plan.group_size for l, layer in enumerate(shapes.layers) for s in layer)


def own_choices(plan) -> int:
    """How many of the plan's linears differ from their layer's choice."""
    return sum(len(c.modules) for c in plan.layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="4bit", help="comma-separated budgets (default 4bit)")
    parser.add_argument("--work", default=None, help="the frontier's working directory (default: "
                                                     "benchmarks/work/frontier; with --smoke a temp dir)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"comma-separated rows to run (default all: {','.join(LAYOUTS)}); `layer` always runs, "
                             "the others are compared with it")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    args = parser.parse_args(argv)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    layouts = ["layer"] + [k.strip() for k in args.layouts.split(",") if k.strip() and k.strip() != "layer"]
    unknown = [k for k in layouts if k not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layout(s) {', '.join(unknown)}: choose from {', '.join(LAYOUTS)}")
    start = time.perf_counter()
    bench = Bench(args.work, smoke=args.smoke)
    settings, dtype = bench.settings, train_dtype()
    profiles = {"layer": bench.search_profile(), "per-linear": bench.search_profile(modules=True)}
    profile_seconds = {k: float((p.parent / "seconds.txt").read_text()) if (p.parent / "seconds.txt").is_file()
                       else None for k, p in profiles.items()}

    rows = []
    for budget in budgets:
        for layout in layouts:
            name = search_name(layout, budget)
            genes, group_sizes = LAYOUTS[layout]
            extra = {} if genes == "layer" else {"genes": genes, "sensitivity": profiles["per-linear"]}
            if group_sizes:
                extra["group_sizes"] = group_sizes
            result = bench.search(name, budget, **extra)
            plan = result.chosen.plan
            cost = bench.search_cost(name, result)
            finals = bench.final_seeds(name, plan, settings, dtype=dtype, search=result)
            seeds, seconds, memory = finals["seeds"], finals["train_seconds"], finals["memory_bytes"]
            assert memory <= result.budget_bytes, f"{name}: {memory} bytes over the budget {result.budget_bytes}"
            rows.append({"budget": budget, "genes": layout, "name": name, "plan": plan.describe(),
                         "plan_layers": plan.to_dict()["layers"], "linears_with_their_own_choice": own_choices(plan),
                         "linears_with_their_own_group": own_groups(plan, bench.shapes),
                         "group_sizes": list(result.config.get("group_sizes") or []),  # what the search chose among
                         "memory_bytes": memory, "budget_bytes": result.budget_bytes, "seeds": seeds,
                         "loss": sum(seeds) / len(seeds), "loss_spread": max(seeds) - min(seeds),
                         "search_loss": result.chosen.loss, "train_seconds": seconds, **cost})
            print(f"genes: {name}: {rows[-1]['loss']:.4f} ({plan.describe()})", flush=True)

    by = {(r["budget"], r["genes"]): r for r in rows}
    for r in rows:
        layer = by[(r["budget"], "layer")]
        r["delta_vs_layer"] = r["loss"] - layer["loss"]
        r["beyond_spread"] = abs(r["delta_vs_layer"]) > max(r["loss_spread"], layer["loss_spread"])
    md = report(rows, settings, profile_seconds, args.smoke)
    payload = {"settings": {**settings, "budgets": budgets, "dtype": dtype, "smoke": args.smoke,
                            "model": bench.model or "smollm2-135m", "data": bench.data or "pydoc-topics"},
               "profile_seconds": profile_seconds, "rows": rows, "seconds": time.perf_counter() - start,
               "environment": environment()}
    md += f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    write_results("genes-smoke" if args.smoke else "genes", payload, md, directory=directory)
    print(md)
    return 0


def report(rows: list[dict], settings: dict, profile_seconds: dict, smoke: bool) -> str:
    title = "a tiny random model (smoke)" if smoke else "SmolLM2-135M-Instruct"
    steps = settings["steps"]
    table = [[r["budget"], r["genes"], f"{r['loss']:.4f} ± {r['loss_spread'] / 2:.4f}", f"{r['delta_vs_layer']:+.4f}"
              + (" (beyond the seed spreads)" if r["beyond_spread"] else ""), f"{r['search_loss']:.4f}",
              f"{r['memory_bytes'] / 2**20:.1f}", f"{r['budget_bytes'] / 2**20:.1f}",
              f"{(r['search_steps'] - r['search_steps_reused']) / steps:.2f}", f"{r['search_seconds']:.0f}",
              r["linears_with_their_own_choice"], r.get("linears_with_their_own_group", 0), r["plan"]] for r in rows]
    layer_s, linear_s = profile_seconds.get("layer"), profile_seconds.get("per-linear")
    md = (f"# Gene layouts on {title}\n\n"
          f"The search at each budget with one bits and one rank gene per decoder layer (`layer`, the default), per "
          f"block of a layer (`groups`: its attention linears, its MLP linears) or per linear (`module`), run as "
          f"benchmarks/frontier.py runs its searches ({settings['search']['cheap']['steps']}-step cheap trials, "
          f"promotion and refinement at {settings['search']['full']['steps']} steps, on the first steps of the final "
          f"fine-tune's schedule, adapters started `{settings['adapter_init']}`); the finer layouts read a profile "
          f"with per-linear estimates (`profile --modules`). Each chosen plan's final fine-tune: {steps} LoRA steps "
          f"of {settings['batch_size']}×{settings['seq_len']} tokens (lr {settings['lr']}), mean of "
          f"{settings['seeds']} seeds (± half the max–min spread), held-out loss on the whole test split. Δ vs layer: "
          f"the mean's difference from the `layer` row of the same budget; beyond the seed spreads when larger than "
          f"both rows' max–min spreads. × final: search steps the final fine-tune does not reuse, per final "
          f"fine-tune. own choice: linears whose bits or rank differ from their layer's. `-g` rows: each unit also "
          f"chooses its group size among {', '.join(map(str, GROUP_SIZES))} where it divides the unit's rows "
          f"(`--group-sizes`); own group: linears not at the plan's group size 64.\n\n")
    md += markdown_table(["budget", "genes", "test loss", "Δ vs layer", "search loss", "MiB", "budget MiB", "× final",
                          "search s", "own choice", "own group", "plan"], table)
    if linear_s is not None:  # the frontier's per-layer profile of this model predates its seconds.txt
        md += (f"\nThe profile with per-linear estimates took {linear_s:.0f} s"
               + (f" (per layer: {layer_s:.0f} s, {linear_s / layer_s:.2f}×)" if layer_s else "")
               + " (benchmarks/results/module_profile.md compares the two in one process).\n")
    return md


if __name__ == "__main__":
    sys.exit(main())
