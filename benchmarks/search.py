"""Search benchmark: our search vs NSGA-II without the Bayesian stage and vs random search, on SmolLM2-135M
with the default data and a `4bit` budget, at the frontier benchmark's settings (benchmarks/frontier.py).

- qradaptor: warm start + NSGA-II + promotion + Bayesian refinement: the frontier benchmark's
  `qradaptor-4bit` search, reused from the shared work dir when it has already run (same settings);
- nsga2: the same search without refinement. With the same seed its exploration and promotion are exactly
  ours, so it is our run's trials minus the refinement ones (its cost: ours minus the refinement steps);
- random: random plans (repaired into the budget) at the cheap fidelity, its best promoted, with
  `--random-factor` times our fine-tune steps (the target: our front dominates random search's with 3x
  fewer steps).

For each: hypervolume of the full-fidelity front (loss × memory, normalised; reference point: the worst loss
seen and the budget), best loss within budget, total search cost in fine-tune steps and in multiples of one
final fine-tune (the frontier benchmark's final fine-tune). Writes benchmarks/results/search.{json,md}.

    .venv/bin/python benchmarks/search.py            # SmolLM2 (reuses benchmarks/work/frontier when present)
    .venv/bin/python benchmarks/search.py --smoke    # a tiny random model, seconds: keeps this script working
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib
    import sys

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402
from qradaptor.search import pareto_front  # noqa: E402


def hypervolume(points, ref_loss: float, ref_memory: float, loss_scale: float, memory_scale: float) -> float:
    """Area dominated by the (loss, memory) front up to the reference point, both axes normalised."""
    front = [p for p in pareto_front(points) if p.loss <= ref_loss and p.memory_bytes <= ref_memory]
    area, prev_loss = 0.0, ref_loss
    for p in front:  # sorted by memory ascending, loss descending
        area += (ref_memory - p.memory_bytes) / memory_scale * (prev_loss - p.loss) / loss_scale
        prev_loss = p.loss
    return area


def smoke_model(tmp: Path) -> tuple[str, str]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp / "model")
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(tmp / "model")
    (tmp / "words.txt").write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    return str(tmp / "model"), str(tmp / "words.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-factor", type=float, default=3.0)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, few trials: checks the script runs")
    parser.add_argument("--out", default=None, help="work directory shared with benchmarks/frontier.py "
                                                    "(default: benchmarks/work/frontier; with --smoke a temp dir)")
    args = parser.parse_args()
    from benchmarks.frontier import Bench

    start = time.perf_counter()
    bench = Bench(args.out, smoke=args.smoke)
    budget, final_steps = "4bit", bench.settings["steps"]
    ours = bench.search("qradaptor-4bit", budget)
    ours_cost = bench.search_cost("qradaptor-4bit", ours)
    full_steps = bench.search_settings["full"]["steps"]
    refined = [p for p in ours.points if p.source == "refine"]
    nsga2_points = [p for p in ours.points if p.source != "refine"]
    random_name = f"random-{args.random_factor:g}x"
    random = bench.search(random_name, budget,
                          **bench.random_settings(round(args.random_factor * ours.fine_tune_steps)))
    random_cost = bench.search_cost(random_name, random)
    runs = {
        "qradaptor": (ours.points, ours_cost["search_steps"], ours_cost["search_seconds"]),
        "nsga2": (nsga2_points, ours_cost["search_steps"] - len(refined) * full_steps, None),
        "random": (random.points, random_cost["search_steps"], random_cost["search_seconds"]),
    }

    full = [p for points, _, _ in runs.values() for p in points if p.fidelity == "full"]
    worst, best = max(p.loss for p in full), min(p.loss for p in full)
    loss_scale = max(worst - best, 1e-3 * abs(worst), 1e-9)
    ref_loss = worst + 0.1 * loss_scale  # a little past the worst point, so every front has some area
    memory_scale = ours.budget_bytes
    rows, fronts = [], {}
    for name, (points, steps, seconds) in runs.items():
        pts = [p for p in points if p.fidelity == "full"]
        fronts[name] = pareto_front(pts)
        chosen = min(pts, key=lambda p: (p.loss, p.memory_bytes))  # alpha = 1: best loss within the budget
        rows.append({
            "method": name,
            # a plan exactly at the budget still counts: the memory reference sits 5% past it
            "hypervolume": hypervolume(pts, ref_loss, 1.05 * ours.budget_bytes, loss_scale, memory_scale),
            "best_loss": chosen.loss,
            "fine_tune_steps": steps,
            "cost_in_final_fine_tunes": steps / final_steps,
            "seconds": seconds,
            "evaluations": len(points),
            "chosen": chosen.to_dict(),
        })
    ours_row, random_row = rows[0], rows[2]
    dominates = all(any(o.loss <= p.loss and o.memory_bytes <= p.memory_bytes for o in fronts["qradaptor"])
                    for p in fronts["random"])
    payload = {"settings": {"budget": budget, "budget_bytes": ours.budget_bytes, "random_factor": args.random_factor,
                            "final_steps": final_steps, "smoke": args.smoke, "work": str(bench.work),
                            "search_config": {k: v for k, v in ours.config.items() if k != "sensitivity"}},
               "methods": rows, "ours_front_dominates_random": dominates,
               "steps_ratio_random_over_ours": random_row["fine_tune_steps"] / max(ours_row["fine_tune_steps"], 1),
               "seconds": time.perf_counter() - start, "environment": environment()}
    md = (f"# Search on {'a tiny random model (smoke)' if args.smoke else 'SmolLM2-135M-Instruct'}, budget {budget}\n\n"
          f"Hypervolume of each method's full-fidelity front (normalised loss × memory; reference: just past the worst "
          f"loss seen, and 5% past the budget); best loss = the best full-fidelity plan within the budget. Settings: "
          f"benchmarks/frontier.py's search (cheap fidelity {bench.search_settings['cheap']['steps']} steps, full "
          f"{full_steps} steps, {bench.settings['seq_len']}-token blocks). One final fine-tune = {final_steps} steps. "
          f"`nsga2` is our run without its refinement trials (identical exploration and promotion at the same seed), "
          f"so it has no separate time.\n\n")
    md += markdown_table(["method", "hypervolume", "best loss", "fine-tune steps", "× final fine-tune", "evaluations", "seconds"],
                         [[r["method"], f"{r['hypervolume']:.4f}", f"{r['best_loss']:.4f}", r["fine_tune_steps"],
                           f"{r['cost_in_final_fine_tunes']:.2f}", r["evaluations"],
                           "—" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows])
    md += (f"\nOur front dominates random search's: {'yes' if dominates else 'NO'} (random used "
           f"{payload['steps_ratio_random_over_ours']:.1f}× our fine-tune steps). Search cost ≤ one final fine-tune: "
           f"{'yes' if ours_row['cost_in_final_fine_tunes'] <= 1 else 'NO'}.\n")
    # smoke results stay out of benchmarks/results/: they measure nothing
    write_results("search-smoke", payload, md, directory=bench.work) if args.smoke else write_results("search", payload, md)
    print(md)


if __name__ == "__main__":
    main()
