"""The search prior's price of rank, measured with the adapter start `train` uses, then tried in the searches (#29).

The search's prior (qradaptor.search.planner.PriorCost) orders its warm-start fills and its repairs: a layer's bits
cost the layer's KL at those bits (the sensitivity profile, before any fine-tune), and halving its rank costs
``rank_value`` × its KL at 4 bits. DESIGN §6's 1/3 came from fine-tunes whose adapters started at zero. With a
quantization-aware start the fine-tune recovers much more of the quantization error, so a bit buys less and rank
relatively more. The price that makes the prior trade them as the fine-tune does:

    rank_value = (Δ per halving of every rank) / (Δ of every layer 4 → 3 bits) × (ΣKL₃ − ΣKL₄) / ΣKL₄

Δ: final test-loss differences between uniform settings trained as benchmarks/frontier.py trains them (its recipe,
seed 0, the same store and ledger): 4-bit r8 − 4-bit r16 (per halving) and 3-bit r16 − 4-bit r16; ΣKL_b: the
profile's per-layer KL at b bits, summed (the profile the frontier's searches read). Uniform 5-bit r16 is set beside
as a check (the prior's 4 → 5-bit step against the fine-tune's), where the ledger has it.

Then the frontier's searches run again at each budget with the measured ``rank_value`` (2 significant digits), their
plans are fine-tuned with 3 seeds (seed 0 continuing the search's run, as `run` does), and the report sets each beside
the same search at the old price, 1/3, and the best uniform setting in the budget (the uniform rows the ledger holds;
their seeds as far as they are measured). The searches at 1/3 are the frontier's own from before the default changed
(moved to ``rank-value-0.333-<budget>``; where missing they run here).

    .venv/bin/python benchmarks/rank_value.py                       # SmolLM2: ~1.5 h beyond what the ledger holds
    .venv/bin/python benchmarks/rank_value.py --budgets 5bit,4bit   # some budgets only (resumable: more later)
    .venv/bin/python benchmarks/rank_value.py --value 2.0           # try a price of your own instead of measuring
    .venv/bin/python benchmarks/rank_value.py --recovered-bits 4    # the same price, bits at and above 4 free
    .venv/bin/python benchmarks/rank_value.py --smoke               # a tiny random model, a few minutes

``--recovered-bits B`` tries the prior's other setting, `SearchConfig.recovered_bits`: a layer's bits are charged
only their KL above the layer's KL at B bits (what the start is counted on recovering; the price of rank, read from the
3 → 4-bit step, is the same for B ≥ 4), against the searches at the same price charging all of it (B = 8).

Resumable (searches in benchmarks/work/frontier/rank-value-<price>[-rb<B>]-<budget>, finals in the frontier's store and
ledger). Writes benchmarks/results/rank_value.{json,md} (with --recovered-bits: rank_value-rb<B>.{json,md}).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402
from benchmarks.frontier import BUDGETS, Bench, run_final, train_dtype, uniform_name  # noqa: E402

OLD = 1 / 3  # the prior's price before this benchmark (DESIGN §6, from zero-start fine-tunes)


def calibrate(bench: Bench, settings: dict, dtype: str) -> dict:
    """Train (or take from the ledger) the uniform rows the price is measured on; return them and the price."""
    from qradaptor.plan import DEFAULT_RANK, Plan
    from qradaptor.profile import Sensitivity
    from qradaptor.search import PriorCost, SearchConfig

    L, ranks = bench.shapes.num_layers, settings["grid"]["ranks"]
    high = DEFAULT_RANK if DEFAULT_RANK in ranks else max(ranks)
    low = max((r for r in ranks if r < high), default=None)
    if low is None:
        raise SystemExit(f"rank_value: the grid's ranks {ranks} have none below {high} to halve to")
    loss = {}
    for bits, rank in ((4, high), (4, low), (3, high)):
        loss[(bits, rank)] = run_final(bench.finals, uniform_name(bits, rank), Plan.uniform(L, bits, rank), settings,
                                       bench.model, bench.data, seed=0, dtype=dtype)["loss"]
    check = run_final(bench.finals, uniform_name(5, high), Plan.uniform(L, 5, high), settings, bench.model, bench.data,
                      seed=0, dtype=dtype, train=False)  # the ledger's, where the frontier trained it
    profile = Sensitivity.load(bench.search_profile())
    prior = PriorCost(profile, SearchConfig(budget_bytes=1, recovered_bits=8))  # the whole KL, as the formula reads
    kl = {b: sum(prior.bits_cost(layer, b) for layer in range(L)) for b in (3, 4, 5)}  # 5: extrapolated, as priced
    halving = (loss[(4, low)] - loss[(4, high)]) / math.log2(high / low)
    step = loss[(3, high)] - loss[(4, high)]
    # where a smaller rank or fewer bits did not end worse, no price can be read from these rows
    value = halving / step * (kl[3] - kl[4]) / kl[4] if halving > 0 and step > 0 else None
    return {"rows": {uniform_name(b, r): v for (b, r), v in loss.items()}, "rank_high": high, "rank_low": low,
            "kl_sum": {str(b): v for b, v in kl.items()}, "per_halving": halving, "three_bit_step": step,
            "five_bit_check": None if check is None else check["loss"] - loss[(4, high)],
            "measured": value, "value": None if value is None else float(f"{value:.2g}")}


def best_uniform(bench: Bench, settings: dict, budget_bytes: int, dtype: str) -> dict | None:
    """The best uniform setting of the frontier's grid (group size 64) within ``budget_bytes``, among those the
    ledger holds (mean of the seeds it holds); nothing is trained for it."""
    from qradaptor.memory import predict
    from qradaptor.plan import Plan

    best = None
    for bits in settings["grid"]["bits"]:
        for rank in settings["grid"]["ranks"]:
            plan = Plan.uniform(bench.shapes.num_layers, bits, rank)
            if predict(bench.shapes, plan, bench.pricing).total_bytes > budget_bytes:
                continue
            name = uniform_name(bits, rank)
            seeds = [r["loss"] for seed in range(settings["seeds"])
                     if (r := run_final(bench.finals, name + (f" seed {seed}" if seed else ""), plan, settings,
                                        bench.model, bench.data, seed=seed, dtype=dtype, train=False)) is not None]
            if seeds and (best is None or sum(seeds) / len(seeds) < best["loss"]):
                best = {"name": name, "seeds": seeds, "loss": sum(seeds) / len(seeds)}
    return best


def search_name(value: float, budget: str, recovered_bits: int = 8) -> str:
    """Where the search at ``budget`` with the prior's ``value`` (and ``recovered_bits``) runs
    (``work/<name>/search``). The frontier's own searches at the old price, made before the default changed, were
    moved there (they are those searches)."""
    return f"rank-value-{value:.3g}" + (f"-rb{recovered_bits}" if recovered_bits != 8 else "") + f"-{budget}"


def prior_label(value: float, recovered_bits: int) -> str:
    return f"rank_value {value:.3g}" + (f", recovered_bits {recovered_bits}" if recovered_bits != 8 else "")


def searched_row(bench: Bench, budget: str, value: float, recovered_bits: int, settings: dict, dtype: str) -> dict:
    """The search at ``budget`` with the prior's ``rank_value`` and ``recovered_bits`` (`search_name`) and its plan's
    finals (3 seeds)."""
    name = search_name(value, budget, recovered_bits)
    result = bench.search(name, budget, rank_value=value, recovered_bits=recovered_bits)
    finals = bench.final_seeds(name, result.chosen.plan, settings, dtype=dtype, search=result)
    seeds = finals["seeds"]
    return {"name": name, "rank_value": value, "recovered_bits": recovered_bits, "plan": result.chosen.plan.describe(),
            "memory_bytes": finals["memory_bytes"], "budget_bytes": result.budget_bytes, "seeds": seeds,
            "loss": sum(seeds) / len(seeds), "loss_spread": max(seeds) - min(seeds),
            "search_loss": result.chosen.loss, **bench.search_cost(name, result)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="the frontier's working directory (default: "
                                                     "benchmarks/work/frontier; with --smoke a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    parser.add_argument("--budgets", default=",".join(BUDGETS),
                        help=f"the budgets to search, comma-separated (default: the frontier's, {','.join(BUDGETS)})")
    parser.add_argument("--value", type=float, default=None,
                        help="search with this rank_value instead of the measured one (the calibration is still "
                             "reported)")
    parser.add_argument("--recovered-bits", type=int, default=None, metavar="B",
                        help="search with the prior charging bits only their KL above B bits' (SearchConfig."
                             "recovered_bits), beside the searches at the same price charging all of it")
    args = parser.parse_args(argv)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets or set(budgets) - set(BUDGETS):
        parser.error(f"--budgets: choose among {', '.join(BUDGETS)}")
    if args.value is not None and not args.value > 0:
        parser.error("--value: a positive number")
    if args.recovered_bits is not None and not 2 <= args.recovered_bits < 8:
        parser.error("--recovered-bits: a bit-width from 2 to 7 (8 is the searches it is compared with)")
    start = time.perf_counter()
    bench = Bench(args.work, smoke=args.smoke)
    settings, dtype = bench.settings, train_dtype()

    calibration = calibrate(bench, settings, dtype)
    value = args.value if args.value is not None else calibration["value"]
    if value is None:
        raise SystemExit(f"rank_value: a smaller rank or fewer bits did not end worse on these rows ({calibration}): "
                         "no price can be read from them; pass --value to search with one of your own")
    measured = calibration["measured"]
    print(f"rank_value: measured {'none' if measured is None else f'{measured:.3f}'}; searching with {value:g}",
          flush=True)
    # the prior compared: this price (and recovered_bits, where given) against the old price, or against this price
    # charging every layer's whole KL
    tried = (value, args.recovered_bits or 8)
    baseline = (value, 8) if args.recovered_bits else (OLD, 8)
    rows = []
    for budget in budgets:  # the results are written after each budget, so a stopped run has reported the rest
        ours = searched_row(bench, budget, *tried, settings, dtype)
        old = searched_row(bench, budget, *baseline, settings, dtype)
        uniform = best_uniform(bench, settings, ours["budget_bytes"], dtype)
        rows.append({"budget": budget, "ours": ours, "old": old, "best_uniform": uniform})
        print(f"rank_value: {budget}: {ours['loss']:.4f} ({ours['plan']}) vs {old['loss']:.4f} ({prior_label(*baseline)})",
              flush=True)
        payload = {"settings": {**settings, "dtype": dtype, "smoke": args.smoke, "old": baseline[0], "value": value,
                                "recovered_bits": tried[1], "baseline_recovered_bits": baseline[1],
                                "model": bench.model or "smollm2-135m", "data": bench.data or "pydoc-topics"},
                   "calibration": calibration, "budgets": rows, "seconds": time.perf_counter() - start,
                   "environment": environment()}
        md = report(calibration, rows, settings, tried, baseline, args.smoke)
        md += f"\nCPU: {describe_cpu(payload['environment'])}.\n"
        directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
        name = "rank_value" + (f"-rb{args.recovered_bits}" if args.recovered_bits else "")
        write_results(name + ("-smoke" if args.smoke else ""), payload, md, directory=directory)
    print(md)
    return 0


def _mean(row: dict | None) -> str:
    if row is None:
        return "not measured"
    seeds = row["seeds"]
    spread = f" ± {(max(seeds) - min(seeds)) / 2:.4f}" if len(seeds) > 1 else ""
    return f"{row['loss']:.4f}{spread} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"


def report(calibration: dict, rows: list[dict], settings: dict, tried: tuple[float, int], baseline: tuple[float, int],
           smoke: bool) -> str:
    c, value = calibration, tried[0]
    ours_label, old_label = prior_label(*tried), prior_label(*baseline)
    old_about = (f"the old price ({OLD:.3f}: the frontier's own, made before the default changed)" if baseline[0] == OLD
                 else f"the same price charging every layer's whole KL ({old_label})")
    title = "a tiny random model (smoke)" if smoke else "SmolLM2-135M-Instruct"
    high, low = c["rank_high"], c["rank_low"]
    md = (f"# The search prior's price of rank on {title}\n\n"
          f"Every fine-tune: the frontier's recipe ({settings['steps']} LoRA steps of {settings['batch_size']}×"
          f"{settings['seq_len']} tokens, lr {settings['lr']:g}, adapters started `{settings['adapter_init']}`), "
          f"held-out loss on the whole test split.\n\n## Calibration\n\n"
          + markdown_table(["uniform row (seed 0)", "test loss"], [[k, f"{v:.4f}"] for k, v in c["rows"].items()])
          + f"\nPer halving of every rank (4-bit r{high} → r{low}): {c['per_halving']:+.4f}; every layer 4 → 3 bits "
            f"(r{high}): {c['three_bit_step']:+.4f}. The profile's KL summed over layers: 3-bit {c['kl_sum']['3']:.4f}, "
            f"4-bit {c['kl_sum']['4']:.4f}. "
          + (f"rank_value = {c['per_halving']:.4f} / {c['three_bit_step']:.4f} × ({c['kl_sum']['3']:.4f} − "
             f"{c['kl_sum']['4']:.4f}) / {c['kl_sum']['4']:.4f} = **{c['measured']:.3f}** (until now: {OLD:.3f})."
             if c["measured"] is not None else "No price can be read from these rows (a step did not end worse).")
          + ("" if value == c["value"] else f" The searches below use {value:g} (given)."))
    if c["five_bit_check"] is not None:
        # the prior's 4 → 5-bit step in the loss units of the 3-bit step it is read against
        priced = -(c["kl_sum"]["4"] - c["kl_sum"]["5"]) / (c["kl_sum"]["3"] - c["kl_sum"]["4"]) * c["three_bit_step"]
        md += (f" Check: every layer 4 → 5 bits (r{high}) changed the loss by {c['five_bit_check']:+.4f}; the prior "
               f"prices that step at {priced:+.4f} (ΣKL₅ {c['kl_sum']['5']:.4f}, extrapolated from the profile's "
               f"widths as the search prices it, against the 3-bit step): it values a 5th bit "
               + ("more" if priced < c["five_bit_check"] else "no more") + " than the fine-tune did.")
        if tried[1] <= 4:
            md += f" With recovered_bits {tried[1]} the prior prices that step at 0 (no width from {tried[1]} up costs KL)."
    md += (f"\n\n## The searches with {ours_label}\n\n"
           f"Each budget's search as benchmarks/frontier.py runs its `qradaptor-<budget>` (same settings, "
           f"the prior's aside), its plan fine-tuned with {settings['seeds']} seeds (mean ± half the max–min spread); "
           f"beside it the same search at {old_about} and the best uniform setting (group size 64) "
           f"within the budget among the rows the ledger holds.\n\n")
    table = []
    for r in rows:
        ours, old, uniform = r["ours"], r["old"], r["best_uniform"]
        table.append([r["budget"], f"{ours['budget_bytes'] / 2**20:.1f}", ours["plan"], _mean(ours),
                      old["plan"], _mean(old), f"{ours['loss'] - old['loss']:+.4f}",
                      "" if uniform is None else f"{uniform['name']} {_mean(uniform)}",
                      "" if uniform is None else f"{ours['loss'] - uniform['loss']:+.4f}",
                      f"{ours['search_steps']} / {old['search_steps']}"])
    md += markdown_table(["budget", "MiB", f"plan ({ours_label})", "test loss", f"plan ({old_label})",
                          "test loss", "Δ", "best uniform", "Δ vs uniform", "search steps (ours / beside)"], table)
    return md


if __name__ == "__main__":
    sys.exit(main())
