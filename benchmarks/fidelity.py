"""Fidelity study (issue 16): which cheap signal ranks plans the way the final fine-tune does.

On plans inside the 4-bit budget of SmolLM2-135M-Instruct (every uniform bits × rank setting that fits,
profile-greedy plans at several fractions of the budget, random plans repaired into it, random plans with no
layer below 3 bits ("mixed": the plans a search must tell apart from the uniform ones), and the plans the first
frontier benchmark's searches chose), each plan gets:

    kl_before      KL(full ‖ quantized) on test blocks before any training (the adapters start at zero)
    loss@K         validation loss after a K-step fine-tune, K = 4, 8, 12, 24, 48, run as the search runs its
                   fidelities (`qradaptor.search.FineTuneFitness`: its compute dtype, warm-up, data order)
    prefix@K       validation loss after the first K steps of the final fine-tune's schedule (100 steps: its warm-up,
                   cosine decay, compute dtype), all K along one 48-step run: what a search that continues its
                   plans' fine-tunes, and the winner's into the final one, would see (`FineTuneFitness.trajectory`)
    final          test loss after the frontier benchmark's final fine-tune (the real `train` stage in a child
                   process: 100 steps of 4×128 tokens at the training defaults), seed 0; seeds 0-2 on the plans
                   named in `seed_plans`, for the seed spread

and these predictors of the final loss, each evaluated leave-one-out (a plan's prediction never saw its own
final loss):

    surrogate      ridge regression of the final loss on (loss@4, loss@8, loss@12, kl_before, mean log2 rank,
                   code bits), AutoQRA-style: the cheap loss and plan features to the expensive loss
    extrapolated   per plan, loss@K ≈ a + b·K^(-c) fitted on K = 8..48 and read at the final step count

For every signal: the Spearman rank correlation with the final loss and the top-3 hit rate (of the three plans
the signal ranks best, the share among the three best by final loss), over all plans and over the better half by
final loss (where the choice is made: bad plans are easy to rank). `chosen` names the signal the search chooses
by: prefix@K at its full fidelity's K (benchmarks/frontier.py's searches, as `qradaptor run` searches: the first K
steps of the final fine-tune's schedule), with the target Spearman ≥ 0.8; `best` names the signal with the best
Spearman over the better half.

    .venv/bin/python benchmarks/fidelity.py            # SmolLM2: ~10 min per plan on 2 cores (resumable)
    .venv/bin/python benchmarks/fidelity.py --smoke    # a tiny random model, about a minute: keeps it working
    .venv/bin/python benchmarks/fidelity.py --report   # write the results from what is done so far

Resumable: every measurement is kept under --work (default benchmarks/work/fidelity) as soon as it is made, and the
rows of benchmarks/results/fidelity.json are put back there when missing (a fresh clone goes on from the results;
rows and measurements taken on other held-out text than today's splits are measured again);
plans are visited in a fixed shuffled order, those with no layer below 3 bits (the ones a search must tell
apart) before the rest, so a partial run covers every kind of contender. Results:
benchmarks/results/fidelity.{json,md} (with --smoke, in the work directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, environment, markdown_table, write_results  # noqa: E402

FULL = {"adapter_init": "activation", "steps": 100, "seq_len": 128, "batch_size": 4, "lr": 3e-4, "short_steps": (4, 8, 12, 24, 48),
        "eval_blocks": 16, "kl_blocks": 16, "profile_tokens": 4096, "greedy": 4, "random": 9, "mixed": 8,
        "seed_plans": ("search-4bit", "greedy-0.70", "random-5", "random-8", "uniform4-r16"), "seeds": 3}
# SMOKE: a few uniform settings (most fit a tiny model's budget)
SMOKE = {"adapter_init": "activation", "steps": 4, "seq_len": 32, "batch_size": 4, "lr": 3e-4, "short_steps": (1, 2, 3), "eval_blocks": 2,
         "kl_blocks": 2, "profile_tokens": 256, "greedy": 2, "random": 2, "mixed": 1, "seed_plans": ("greedy-0.70",),
         "seeds": 2, "uniform": {"bits": (3, 4), "ranks": (4, 16)}}
#: Plans the first frontier benchmark's searches chose for SmolLM2 (benchmarks/results/frontier.json at 822f055;
#: per layer bits/rank), studied as the search-found plans: the 3-bit, 3.5-bit and 4-bit budgets' choices and the
#: bits-only ablation's. All fit the 4-bit budget.
SEARCH_FOUND = {
    "search-3bit": "4/4,4/4,4/8,4/4,4/4,4/4,4/4,4/4,4/4,4/4,4/4,5/16,4/4,4/4,4/4,4/4,4/4,4/4,4/4,4/4,4/4,4/4,4/4,4/4,"
                   "4/4,3/4,4/4,4/4,4/4,5/8",
    "search-3.5bit": "5/8,5/8,5/16,5/8,4/4,4/4,4/4,4/4,4/8,4/8,4/4,6/32,5/8,4/8,4/4,4/8,4/4,4/4,4/8,4/4,4/4,4/4,4/4,4/4,"
                     "4/4,4/4,4/4,4/4,4/8,5/32",
    "search-4bit": "5/16,5/16,5/16,5/8,4/4,4/8,4/8,4/8,5/8,5/8,4/8,6/32,5/16,5/8,4/8,5/8,5/8,4/4,5/8,5/8,4/8,4/4,4/4,4/8,"
                   "4/4,4/4,4/4,4/4,5/8,6/32",
    "search-4bit-r16": ",".join(["3/16"] + ["4/16"] * 3 + ["5/16"] + ["4/16"] * 25),
}
FEATURES = ("loss@4", "loss@8", "loss@12", "kl_before", "log2_rank", "code_bits")


# ---------------------------------------------------------------------------------------- statistics


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def top3(signal: list[float], final: list[float]) -> float | None:
    if len(signal) < 3:
        return None
    best = set(sorted(range(len(final)), key=lambda i: final[i])[:3])
    picked = set(sorted(range(len(signal)), key=lambda i: signal[i])[:3])
    return len(best & picked) / 3


def ridge_loo(x: list[list[float]], y: list[float], alpha: float = 1e-2) -> list[float]:
    """Leave-one-out predictions of a ridge regression on standardised features."""
    import torch

    X, Y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    out = []
    for i in range(len(y)):
        keep = [j for j in range(len(y)) if j != i]
        xs, ys = X[keep], Y[keep]
        mean, std = xs.mean(0), xs.std(0).clamp_min(1e-12)
        a = torch.cat([torch.ones(len(keep), 1, dtype=torch.float64), (xs - mean) / std], 1)
        reg = alpha * torch.eye(a.shape[1], dtype=torch.float64)
        reg[0, 0] = 0  # the intercept is not shrunk
        w = torch.linalg.solve(a.T @ a + reg, a.T @ ys)
        xi = torch.cat([torch.ones(1, dtype=torch.float64), (X[i] - mean) / std])
        out.append(float(xi @ w))
    return out


def extrapolate(steps: list[int], losses: list[float], target: int) -> float:
    """loss(K) ≈ a + b·K^(-c), least squares over c on a grid (a, b linear for each c), read at ``target``."""
    best = None
    for c in [0.05 * i for i in range(1, 41)]:
        xs = [k ** -c for k in steps]
        n, sx, sy = len(xs), sum(xs), sum(losses)
        sxx, sxy = sum(v * v for v in xs), sum(v * w for v, w in zip(xs, losses))
        den = n * sxx - sx * sx
        if abs(den) < 1e-18:
            continue
        b = (n * sxy - sx * sy) / den
        a = (sy - b * sx) / n
        err = sum((a + b * v - w) ** 2 for v, w in zip(xs, losses))
        if best is None or err < best[0]:
            best = (err, a, b, c)
    _, a, b, c = best
    return a + b * target ** -c


# ---------------------------------------------------------------------------------------- the plans


def candidate_plans(bench, settings: dict) -> list[tuple[str, object]]:
    """(name, plan) of every plan studied, in the fixed shuffled order they are measured in."""
    from qradaptor.memory import parse_budget, predict
    from qradaptor.plan import Plan
    from qradaptor.search import Planner, PriorCost, SearchConfig

    L = bench.shapes.num_layers
    budget = parse_budget("4bit", bench.shapes, bench.backend)
    # the prior the committed study's plans came from (before the start's price of rank and recovered bits), so a
    # retake measures the same plans
    prior = {"rank_value": 1 / 3, "recovered_bits": 8}
    config = SearchConfig(budget_bytes=budget, seq_len=settings["seq_len"], **prior)
    planner = Planner(bench.shapes, bench.backend, PriorCost(bench.sensitivity, config), config)
    grid = settings.get("uniform", {"bits": config.bits, "ranks": config.ranks})
    plans = [(f"uniform{b}-r{r}", Plan.uniform(L, b, r)) for b in grid["bits"] for r in grid["ranks"]
             if predict(bench.shapes, Plan.uniform(L, b, r), bench.backend).total_bytes <= budget]
    floor = planner.memory(Plan.uniform(L, config.bits[0], config.ranks[0]))
    n = settings["greedy"]
    for i in range(n):
        fraction = 0.7 + 0.3 * i / max(1, n - 1)
        plans.append((f"greedy-{fraction:.2f}", planner.fill(floor + int(fraction * (budget - floor)))))
    from qradaptor.plan import LayerChoice

    rng = random.Random(0)
    for i in range(settings["random"]):
        choices = [LayerChoice(rng.choice(config.bits), rng.choice(config.ranks)) for _ in range(L)]
        plans.append((f"random-{i}", planner.repair(Plan(choices), budget)))
    # random plans over 3 bits and up, repaired by a planner that cannot go below 3 bits either
    mixed = SearchConfig(budget_bytes=budget, seq_len=settings["seq_len"], bits=tuple(b for b in config.bits if b >= 3),
                         **prior)
    mixed_planner = Planner(bench.shapes, bench.backend, PriorCost(bench.sensitivity, mixed), mixed)
    rng = random.Random(2)
    for i in range(settings["mixed"]):
        choices = [LayerChoice(rng.choice(mixed.bits[:-1]), rng.choice(config.ranks)) for _ in range(L)]
        plans.append((f"mixed-{i}", mixed_planner.repair(Plan(choices), budget)))
    if not bench.smoke:
        from qradaptor.search.planner import plan_from_key

        plans += [(name, plan_from_key(key, config)) for name, key in SEARCH_FOUND.items()
                  if len(key.split(",")) == L]
    seen, unique = set(), []
    for name, plan in plans:  # a greedy or repaired plan can coincide with another
        key = json.dumps(plan.to_dict(), sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append((name, plan))
    random.Random(1).shuffle(unique)
    return unique


def measured_signals(settings: dict) -> set[str]:
    """What a finished row holds (a row from before a signal was added lacks it, and is completed)."""
    return {"kl_before", "final", *(f"{kind}@{k}" for kind in ("loss", "prefix") for k in settings["short_steps"])}


def _contender(plan) -> bool:
    return min(c.bits for c in plan.layers) >= 3


def plan_id(plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- measurements


def cached(path: Path, compute, held_out: str):
    """The JSON value kept at ``path``, computing and keeping it first if it is not there or was taken on other
    held-out text (``held_out``: `frontier.held_out_fingerprint` of the splits it is measured on)."""
    from qradaptor.io import atomic_write_json

    kept = json.loads(path.read_text()) if path.is_file() else {}
    if kept.get("held_out") != held_out:
        atomic_write_json(path, {"value": compute(), "held_out": held_out})
        kept = json.loads(path.read_text())
    return kept["value"]


def measure(bench, name: str, plan, settings: dict, kl_blocks, *, seeds: int) -> dict:
    from benchmarks.frontier import held_out_fingerprint, kl_to_full, run_final, train_dtype
    from qradaptor.search import Fidelity

    d = bench.work / "plans" / plan_id(plan)
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps({"name": name, "plan": plan.to_dict()}))
    held_out = held_out_fingerprint(bench.data, settings["seq_len"])  # KL on test blocks, the losses on validation
    row = {"name": name, "plan": plan.describe(), "id": plan_id(plan), "held_out": held_out}
    row["kl_before"] = cached(d / "kl.json", lambda: kl_to_full(bench.base, plan, kl_blocks, bench.fitness.cache,
                                                                 None), held_out)
    for k in settings["short_steps"]:
        fidelity = Fidelity(f"k{k}", steps=k, eval_blocks=settings["eval_blocks"], batch_size=settings["batch_size"],
                            lr=settings["lr"])
        row[f"loss@{k}"] = cached(d / f"loss-{k}.json", lambda: bench.fitness(plan, fidelity)[0], held_out)
    # one run on the final fine-tune's schedule, evaluated at every K on its way
    ks = list(settings["short_steps"])
    prefix = Fidelity("prefix", steps=max(ks), eval_blocks=settings["eval_blocks"], batch_size=settings["batch_size"],
                      lr=settings["lr"], schedule_steps=settings["steps"])
    along = cached(d / "prefix.json", lambda: {str(k): v for k, v in bench.prefix_fitness().trajectory(plan, prefix,
                                                                                                       ks).items()},
                   held_out)
    row.update({f"prefix@{k}": along[str(k)] for k in ks})
    finals = []
    for seed in range(seeds):
        # the real training stage in a child process, with the training defaults (dtype, checkpointing)
        result = run_final(bench.finals, f"{name} seed {seed}", plan, settings, bench.model, bench.data, seed=seed,
                           dtype=train_dtype())
        finals.append(result["loss"])
        row.setdefault("train_seconds", result["train_seconds"])
    row["final"], row["final_seeds"] = finals[0], finals
    row["log2_rank"] = sum(math.log2(c.rank) for c in plan.layers) / len(plan.layers)
    row["code_bits"] = sum(c.bits for c in plan.layers) / len(plan.layers)
    return row


def restore_rows(work: Path, results: Path, held_out: str) -> tuple[int, int]:
    """Put the rows of the committed results (``results``/fidelity.json) back into ``work`` where they are missing:
    a fresh clone resumes the study where the last run's results left it instead of measuring those plans again.
    Only rows measured on today's held-out splits (``held_out``, `frontier.held_out_fingerprint`) come back: the
    others are measured again. Returns (rows restored, rows left out as measured on other held-out text)."""
    from qradaptor.io import atomic_write_json

    path = results / "fidelity.json"
    if not path.is_file():
        return 0, 0
    restored = stale = 0
    for row in json.loads(path.read_text())["plans"]:
        target = work / "rows" / f"{row['id']}.json"
        if row.get("held_out") != held_out:
            stale += 1
        elif not target.is_file():
            atomic_write_json(target, row)
            restored += 1
    return restored, stale


def finished(row: dict, settings: dict, held_out: str) -> bool:
    """Whether ``row`` holds every signal, all measured on today's held-out splits."""
    return measured_signals(settings) <= row.keys() and row.get("held_out") == held_out


def done_rows(work: Path, settings: dict, held_out: str) -> list[dict]:
    """Rows of the plans whose every measurement is done on today's held-out splits (for --report while a run is
    under way)."""
    rows = [json.loads(path.read_text()) for path in sorted((work / "rows").glob("*.json"))]
    return [r for r in rows if finished(r, settings, held_out)]


# ---------------------------------------------------------------------------------------- the report


def analyse(rows: list[dict], settings: dict) -> dict:
    final = [r["final"] for r in rows]
    signals = {"kl_before": [r["kl_before"] for r in rows]}
    for k in settings["short_steps"]:
        signals[f"loss@{k}"] = [r[f"loss@{k}"] for r in rows]
    for k in settings["short_steps"]:
        signals[f"prefix@{k}"] = [r[f"prefix@{k}"] for r in rows]
    features = [f for f in FEATURES if f in rows[0]] if rows else []
    if len(rows) >= len(features) + 3:
        signals["surrogate"] = ridge_loo([[r[f] for f in features] for r in rows], final)
    fit_steps = [k for k in settings["short_steps"] if k >= 8] or list(settings["short_steps"])
    if len(fit_steps) >= 3:
        signals["extrapolated"] = [extrapolate(fit_steps, [r[f"loss@{k}"] for k in fit_steps], settings["steps"])
                                   for r in rows]
    better = sorted(range(len(rows)), key=lambda i: final[i])[: max(3, len(rows) // 2)]
    out = []
    for name, values in signals.items():
        sub_v, sub_f = [values[i] for i in better], [final[i] for i in better]
        out.append({"name": name, "spearman": spearman(values, final), "top3": top3(values, final),
                    "spearman_better_half": spearman(sub_v, sub_f), "top3_better_half": top3(sub_v, sub_f)})
    ranked = [s for s in out if s["spearman_better_half"] is not None]
    best = max(ranked, key=lambda s: s["spearman_better_half"])["name"] if ranked else None
    chosen = next(s for s in out if s["name"] == settings["chosen"])
    spreads = [max(r["final_seeds"]) - min(r["final_seeds"]) for r in rows if len(r["final_seeds"]) > 1]
    return {"signals": out, "chosen": chosen["name"], "best": best,
            "chosen_spearman_at_least_0.8": chosen["spearman"] is not None and chosen["spearman"] >= 0.8,
            "seed_spread_max": max(spreads) if spreads else None,
            "seed_spread_mean": sum(spreads) / len(spreads) if spreads else None,
            "plans_with_seeds": len(spreads)}


def report(rows: list[dict], settings: dict, planned: int, smoke: bool) -> tuple[dict, str]:
    stats = analyse(rows, settings)
    payload = {"smoke": smoke, "settings": settings, "environment": environment(), "plans_done": len(rows),
               "plans_planned": planned, **stats, "plans": rows}
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    md = (f"# Fidelity: which cheap signal ranks plans like the final fine-tune{' (smoke)' if smoke else ''}\n\n"
          f"{len(rows)} of {planned} plans measured inside the 4-bit budget "
          f"({'a tiny random model' if smoke else 'SmolLM2-135M-Instruct'}). Final: test loss after "
          f"{settings['steps']} steps of {settings['batch_size']}×{settings['seq_len']} tokens (the `train` stage, "
          f"its default dtype). loss@K: validation loss after the search's K-step fine-tune (its own schedule). "
          f"prefix@K: validation loss after the first K steps of the final fine-tune's schedule. Surrogate and "
          f"extrapolated: leave-one-out predictions. Better half: the half of the plans with the lower final loss.\n\n")
    md += markdown_table(["signal", "Spearman", "top-3", "Spearman (better half)", "top-3 (better half)"],
                         [[s["name"], fmt(s["spearman"]), fmt(s["top3"]), fmt(s["spearman_better_half"]),
                           fmt(s["top3_better_half"])] for s in stats["signals"]])
    chosen = next(s for s in stats["signals"] if s["name"] == stats["chosen"])
    md += (f"\nThe search chooses by **{stats['chosen']}** (its full fidelity: the first steps of the final "
           f"fine-tune's schedule): Spearman {fmt(chosen['spearman'])}, {fmt(chosen['spearman_better_half'])} over the "
           f"better half; target ≥ 0.8: {'met' if stats['chosen_spearman_at_least_0.8'] else 'MISSED'}. Best signal "
           f"over the better half: {stats['best']}. Seed spread of the final loss "
           f"(max − min over {settings['seeds']} seeds) on {stats['plans_with_seeds']} plans: max "
           f"{fmt(stats['seed_spread_max'])}, mean {fmt(stats['seed_spread_mean'])}.\n\n")
    per_k = [f"{kind}@{k}" for kind in ("loss", "prefix") for k in settings["short_steps"]]
    cols = ["plan", "final", "kl_before"] + per_k + ["layout"]
    md += markdown_table(cols, [[r["name"], f"{r['final']:.4f}", f"{r['kl_before']:.4f}"]
                                + [f"{r[key]:.4f}" for key in per_k]
                                + [r["plan"].replace("|", "/")] for r in sorted(rows, key=lambda r: r["final"])])
    return payload, md


# ---------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script")
    parser.add_argument("--work", type=Path, default=None, help="resumable working directory "
                                                               "(default benchmarks/work/fidelity[-smoke])")
    parser.add_argument("--report", action="store_true", help="only write the results of the plans done so far")
    parser.add_argument("--max-plans", type=int, default=None, help="stop after this many plans (the rest later)")
    args = parser.parse_args(argv)

    from benchmarks import frontier
    from qradaptor.data import load_blocks

    settings = dict(SMOKE if args.smoke else FULL)
    # the signal the frontier's searches choose by: their full fidelity, on the final fine-tune's schedule
    full_steps = (frontier.SMOKE if args.smoke else frontier.FULL)["search"]["full"]["steps"]
    assert full_steps in settings["short_steps"], "the study measures the searches' full fidelity"
    settings["chosen"] = f"prefix@{full_steps}"
    work = args.work or Path(__file__).resolve().parent / "work" / ("fidelity-smoke" if args.smoke else "fidelity")
    bench = frontier.Bench(str(work), smoke=args.smoke)
    plans = candidate_plans(bench, settings)
    held_out = frontier.held_out_fingerprint(bench.data, settings["seq_len"])
    restored, stale = (0, 0) if args.smoke else restore_rows(work, RESULTS, held_out)
    if restored:
        print(f"fidelity: {restored} plans' rows restored from {RESULTS / 'fidelity.json'}", flush=True)
    if stale:
        print(f"fidelity: {stale} plans' rows of {RESULTS / 'fidelity.json'} were measured on other held-out text "
              "(the default corpus's splits before they lost the paragraphs training holds): measured again",
              flush=True)
    if not args.report:
        kl_blocks = load_blocks(bench.data, bench.tokenizer, "test", seq_len=settings["seq_len"],
                                max_blocks=settings["kl_blocks"])
        start = time.perf_counter()
        # Rows measured before a signal was added are completed first (quick: the rest is kept). Then the plans a
        # search must tell apart (uniform settings of 3 bits or more, greedy fills, mixed and search-found plans),
        # then the rest: plans with 2-bit layers are far behind and easy to rank. Within each kind: shuffled.
        started = {p.stem for p in (work / "rows").glob("*.json")}
        order = sorted(range(len(plans)), key=lambda j: (plan_id(plans[j][1]) not in started,
                                                         not _contender(plans[j][1])))
        for i in order[: args.max_plans]:
            name, plan = plans[i]
            row_path = work / "rows" / f"{plan_id(plan)}.json"
            if row_path.is_file() and finished(json.loads(row_path.read_text()), settings, held_out):
                continue
            print(f"fidelity: plan {i + 1}/{len(plans)} {name} ({plan.describe()})", flush=True)
            row = measure(bench, name, plan, settings, kl_blocks,
                          seeds=settings["seeds"] if name in settings["seed_plans"] else 1)
            from qradaptor.io import atomic_write_json

            atomic_write_json(row_path, row)
        print(f"fidelity: measured for {time.perf_counter() - start:.0f} s", flush=True)
    rows = done_rows(work, settings, held_out)
    if not rows:
        sys.exit("fidelity: no plan is measured on today's held-out splits yet; run without --report first")
    payload, md = report(rows, settings, len(plans), args.smoke)
    where = work if args.smoke else RESULTS
    write_results("fidelity", payload, md, where)
    print(f"fidelity: wrote {where}/fidelity.json and fidelity.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
