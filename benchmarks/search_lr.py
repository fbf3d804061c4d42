"""At which learning rate should the search's fine-tunes train? (issue #29: at lr 3e-3 the prefix ranks plans wrongly)

`qradaptor run` ranks plans on the first steps of the final fine-tune's schedule, at its learning rate. At the
recipe's 3e-4 that prefix ranks plans like the final loss (results/fidelity.md, Spearman 0.988 at 8 steps); at 3e-3,
the best rate measured at 100 steps (results/learning_rate.md), the `4bit` search chose uniform 5-bit r4 over
uniform 4-bit r16, which ends far better (results/ablation-lr0.003.md): at that rate a small adapter on
better-kept weights leads for the first ~64 steps, and rank pays only late. (Fine-tunes of their own schedule,
annealed within K steps, ranked the two the same wrong way at 8, 16 and 32 steps in a check this script does not
repeat.) So: is the ranking the final fine-tune makes at a high rate one that the search sees at a lower one?

For contender plans inside the 4-bit budget of SmolLM2-135M-Instruct (the fidelity study's plans, by name: uniform
settings, greedy fills, searched plans), one final fine-tune each at the final rate (``--lr``; the
frontier's recipe otherwise: 100 steps of 4×128 tokens, the activation start, seed 0), and the search's signal,
prefix@K (held-out loss after the first K steps of the final fine-tune's schedule, in its dtype, with the start),
with the search's fine-tunes at each rate of ``--search-lrs``. Per search rate and K: Spearman against the final
loss, the plan the signal ranks first, and its regret (its final loss − the best final loss among the plans).

    .venv/bin/python benchmarks/search_lr.py              # SmolLM2, final rate 3e-3: ~6 min per final, resumable
    .venv/bin/python benchmarks/search_lr.py --lr 3e-4 --search-lrs 3e-4   # the recipe's rate (finals from the ledger)
    .venv/bin/python benchmarks/search_lr.py --smoke      # a tiny random model: the script runs

Finals go to the frontier's store and ledger (benchmarks/work/finals, results/finals.json; the rate is part of their
key): the ablation's rows at 3e-3 are not trained again. Signals are kept under --work (default: the frontier's at
that rate, benchmarks/work/frontier-lr<lr>, whose profile the greedy plans come from) in search_lr/, as they are
measured. Writes benchmarks/results/search_lr.{json,md} (at another final rate, search_lr-lr<rate>.{json,md}: at
the recipe's 3e-4 with ``--search-lrs 3e-4`` it is the fidelity check of the search's signal with the start, on the
clean split).
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

#: The fidelity study's plans that a search at `4bit` has to tell apart (from its better half, and 5-bit r4, which
#: the search chose at 3e-3).
PLANS = ("uniform4-r16", "uniform5-r4", "uniform4-r8", "greedy-1.00", "greedy-0.90", "search-4bit-r16",
         "search-3.5bit")
SEARCH_LRS = (3e-4, 1e-3, 3e-3)
FINAL_LR = 3e-3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=FINAL_LR, help="the final fine-tunes' rate (default %(default)g)")
    parser.add_argument("--search-lrs", default=",".join(f"{x:g}" for x in SEARCH_LRS),
                        help="the rates of the search's fine-tunes, comma-separated (default %(default)s)")
    parser.add_argument("--plans", default=",".join(PLANS), help="the fidelity study's plans, by name "
                                                                 "(default %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script")
    parser.add_argument("--work", type=Path, default=None, help="resumable working directory (default: the frontier's "
                                                               "at --lr, benchmarks/work/frontier-lr<lr>; with "
                                                               "--smoke a temp dir)")
    args = parser.parse_args(argv)
    try:
        search_lrs = list(dict.fromkeys(float(x) for x in args.search_lrs.split(",")))
    except ValueError:
        parser.error(f"--search-lrs takes numbers separated by commas, not {args.search_lrs!r}")
    began = time.perf_counter()
    from benchmarks import fidelity, frontier
    from qradaptor.search import Fidelity

    settings = dict(fidelity.SMOKE if args.smoke else fidelity.FULL)
    # the frontier's work directory at this rate (its profile made once), the signals under its search_lr/
    bench = frontier.Bench(str(args.work) if args.work else None, smoke=args.smoke, lr=args.lr)
    ks = [frontier_steps(bench, "cheap"), frontier_steps(bench, "full")]
    candidates = dict(fidelity.candidate_plans(bench, settings))
    if args.smoke:  # a tiny model's names differ: its first few plans
        names = list(candidates)[:4]
    else:
        names = [n.strip() for n in args.plans.split(",") if n.strip()]
        unknown = [n for n in names if n not in candidates]
        if unknown:
            parser.error(f"unknown plans {', '.join(unknown)}: the fidelity study's are {', '.join(candidates)}")
    fitness = bench.started_fitness(bench.settings["adapter_init"])
    held_out = frontier.held_out_fingerprint(bench.data, bench.settings["seq_len"])  # its signals: validation loss
    rows = []
    for name in names:
        plan = candidates[name]
        d = bench.work / "search_lr" / fidelity.plan_id(plan)
        d.mkdir(parents=True, exist_ok=True)
        row = {"name": name, "plan": plan.describe(), "id": fidelity.plan_id(plan), "held_out": held_out}
        final = frontier.run_final(bench.finals, f"{name} lr {args.lr:g}", plan, bench.settings, bench.model,
                                   bench.data, seed=0, dtype=frontier.train_dtype())
        row["final"], row["train_seconds"] = final["loss"], final["train_seconds"]
        for lr in search_lrs:
            prefix = Fidelity("prefix", steps=max(ks), eval_blocks=settings["eval_blocks"],
                              batch_size=bench.settings["batch_size"], lr=lr, schedule_steps=bench.settings["steps"])
            along = fidelity.cached(d / f"prefix-lr{lr:g}.json", lambda: {
                str(k): v for k, v in fitness.trajectory(plan, prefix, ks).items()}, held_out)
            row.update({f"prefix@{k} lr {lr:g}": along[str(k)] for k in ks})
        print(f"search_lr: {name}: final {row['final']:.4f}; "
              + ", ".join(f"{k}: {v:.4f}" for k, v in row.items() if k.startswith("prefix")), flush=True)
        rows.append(row)
    payload = {"smoke": args.smoke, "final_lr": args.lr, "search_lrs": search_lrs, "steps_ranked": ks,
               "settings": {k: bench.settings[k] for k in ("steps", "seq_len", "batch_size", "adapter_init")},
               "dtype": frontier.train_dtype(), "signals": analyse(rows, search_lrs, ks), "plans": rows,
               "seconds": time.perf_counter() - began, "environment": environment()}
    md = report(payload) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    write_results(results_name(args.lr, args.smoke), payload, md,
                  directory=bench.work if args.smoke else RESULTS)  # smoke results measure nothing
    print(md)
    return 0


def results_name(final_lr: float, smoke: bool = False) -> str:
    """``search_lr`` for finals at `FINAL_LR`, ``search_lr-lr<rate>`` at another (each rate's study is its own)."""
    return "search_lr" + ("" if final_lr == FINAL_LR else f"-lr{final_lr:g}") + ("-smoke" if smoke else "")


def frontier_steps(bench, fidelity_name: str) -> int:
    """The steps the frontier's searches rank plans on at their ``cheap`` or ``full`` fidelity."""
    return bench.search_settings[fidelity_name]["steps"]


def analyse(rows: list[dict], search_lrs: list[float], ks: list[int]) -> list[dict]:
    """Per search rate and K: Spearman of prefix@K against the final loss, the plan ranked first, its regret."""
    from benchmarks.fidelity import spearman

    final = [r["final"] for r in rows]
    best = min(final)
    out = []
    for lr in search_lrs:
        for k in ks:
            values = [r[f"prefix@{k} lr {lr:g}"] for r in rows]
            first = min(range(len(rows)), key=lambda i: values[i])
            out.append({"search_lr": lr, "k": k, "spearman": spearman(values, final), "first": rows[first]["name"],
                        "first_final": final[first], "regret": final[first] - best})
    return out


def report(payload: dict) -> str:
    rows, ks, lrs = payload["plans"], payload["steps_ranked"], payload["search_lrs"]
    s = payload["settings"]
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    best = min(rows, key=lambda r: r["final"])
    md = (f"# The search's learning rate, for a final fine-tune at {payload['final_lr']:g}"
          f"{' (smoke)' if payload['smoke'] else ''}\n\n"
          f"{len(rows)} plans inside the 4-bit budget ({'a tiny random model' if payload['smoke'] else 'SmolLM2-135M-Instruct'}). "
          f"Final: test loss after {s['steps']} steps of {s['batch_size']}×{s['seq_len']} tokens at lr "
          f"{payload['final_lr']:g} ({payload['dtype']}, `{s['adapter_init']}` start, seed 0). prefix@K at rate r: "
          f"validation loss after the first K steps of a {s['steps']}-step schedule with peak rate r (what a search "
          f"whose fine-tunes train at r sees; the frontier's searches rank on K = {ks[0]} and {ks[-1]}). Regret: the "
          f"final loss of the plan the signal ranks first − the best final loss ({best['name']}, {best['final']:.4f}).\n\n")
    md += markdown_table(["search rate", "K", "Spearman", "ranked first", "its final", "regret"],
                         [[f"{a['search_lr']:g}", a["k"], fmt(a["spearman"]), a["first"], f"{a['first_final']:.4f}",
                           f"{a['regret']:+.4f}"] for a in payload["signals"]])
    cols = [f"prefix@{k} lr {lr:g}" for lr in lrs for k in ks]
    md += "\n" + markdown_table(["plan", "final"] + cols + ["layout"],
                                [[r["name"], f"{r['final']:.4f}"] + [f"{r[c]:.4f}" for c in cols]
                                 + [r["plan"].replace("|", "/")] for r in sorted(rows, key=lambda r: r["final"])])
    return md


if __name__ == "__main__":
    sys.exit(main())
