"""Search benchmark: our search vs random search and vs NSGA-II without the Bayesian stage, on SmolLM2-135M
with the default data and a `4bit` budget, in one run.

- qradaptor: warm start + NSGA-II + promotion + Bayesian refinement;
- nsga2: the same without refinement;
- random: random plans (repaired into the budget) at the cheap fidelity, its best promoted, with `--random-factor`
  times our fine-tune steps (the target: our front dominates random search's with 3x fewer steps).

For each: hypervolume of the full-fidelity front (loss × memory, normalised; reference point: the worst loss
seen and the budget), best loss within budget, total search cost in fine-tune steps and in multiples of one
final fine-tune (`--final-steps`). Writes benchmarks/results/search.{json,md} and per-method output dirs.

    .venv/bin/python benchmarks/search.py            # SmolLM2, long (about an hour on 2 cores)
    .venv/bin/python benchmarks/search.py --smoke    # a tiny random model, seconds: keeps this script working
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib
    import sys

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402
from qradaptor.search import pareto_front, search  # noqa: E402


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
    parser.add_argument("--budget", default="4bit")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--random-factor", type=float, default=3.0)
    parser.add_argument("--final-steps", type=int, default=400, help="length of one final fine-tune, for the cost ratio")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, few trials: checks the script runs")
    parser.add_argument("--out", default=None, help="where the per-method search directories go (default: a temp dir)")
    args = parser.parse_args()

    tmp = Path(args.out or tempfile.mkdtemp(prefix="qradaptor-search-bench-"))
    model, data, extra = None, None, {}
    if args.smoke:
        model, data = smoke_model(tmp)
        extra = {"seq_len": 32, "promote": 1, "population": 4}
        args.trials, args.final_steps, args.random_factor = 6, 100, 1.0
    common = dict(model=model, data=data, budget=args.budget, progress=not args.smoke, **extra)
    runs, rows = {}, []
    start = time.perf_counter()
    ours = search(out=tmp / "qradaptor", trials=args.trials, refine=1 if args.smoke else 3, **common)
    runs["qradaptor"] = ours
    runs["nsga2"] = search(out=tmp / "nsga2", trials=args.trials, refine=0, **common)
    cheap_steps = ours.config["cheap"]["steps"]
    random_trials = max(2, round(args.random_factor * ours.fine_tune_steps / cheap_steps))
    runs["random"] = search(out=tmp / "random", trials=random_trials, refine=0, sampler="random", **common)

    full = [p for r in runs.values() for p in r.points if p.fidelity == "full"]
    worst, best = max(p.loss for p in full), min(p.loss for p in full)
    loss_scale = max(worst - best, 1e-3 * abs(worst), 1e-9)
    ref_loss = worst + 0.1 * loss_scale  # a little past the worst point, so every front has some area
    memory_scale = ours.budget_bytes
    for name, r in runs.items():
        pts = [p for p in r.points if p.fidelity == "full"]
        rows.append({
            "method": name,
            # a plan exactly at the budget still counts: the memory reference sits 5% past it
            "hypervolume": hypervolume(pts, ref_loss, 1.05 * r.budget_bytes, loss_scale, memory_scale),
            "best_loss": min(p.loss for p in pts),
            "fine_tune_steps": r.fine_tune_steps,
            "cost_in_final_fine_tunes": r.fine_tune_steps / args.final_steps,
            "seconds": r.seconds,
            "evaluations": len(r.points),
            "chosen": r.chosen.to_dict(),
        })
    ours_row = rows[0]
    random_row = next(r for r in rows if r["method"] == "random")
    dominates = all(any(o.loss <= p.loss and o.memory_bytes <= p.memory_bytes
                        for o in runs["qradaptor"].front("full")) for p in runs["random"].front("full"))
    payload = {"settings": {"budget": args.budget, "budget_bytes": ours.budget_bytes, "trials": args.trials,
                            "random_factor": args.random_factor, "final_steps": args.final_steps,
                            "smoke": args.smoke, "search_config": {k: v for k, v in ours.config.items() if k != "sensitivity"}},
               "methods": rows, "ours_front_dominates_random": dominates,
               "steps_ratio_random_over_ours": random_row["fine_tune_steps"] / max(ours_row["fine_tune_steps"], 1),
               "seconds": time.perf_counter() - start, "environment": environment()}
    md = (f"# Search on {'a tiny random model (smoke)' if args.smoke else 'SmolLM2-135M-Instruct'}, budget {args.budget}\n\n"
          f"Hypervolume of each method's full-fidelity front (normalised loss × memory; reference: just past the worst "
          f"loss seen, and 5% past the budget). One final fine-tune = {args.final_steps} steps.\n\n")
    md += markdown_table(["method", "hypervolume", "best loss", "fine-tune steps", "× final fine-tune", "evaluations", "seconds"],
                         [[r["method"], f"{r['hypervolume']:.4f}", f"{r['best_loss']:.4f}", r["fine_tune_steps"],
                           f"{r['cost_in_final_fine_tunes']:.2f}", r["evaluations"], f"{r['seconds']:.0f}"] for r in rows])
    md += (f"\nOur front dominates random search's: {'yes' if dominates else 'NO'} (random used "
           f"{payload['steps_ratio_random_over_ours']:.1f}× our fine-tune steps). Search cost ≤ one final fine-tune: "
           f"{'yes' if ours_row['cost_in_final_fine_tunes'] <= 1 else 'NO'}.\n")
    # smoke results stay out of benchmarks/results/: they measure nothing
    write_results("search-smoke", payload, md, directory=tmp) if args.smoke else write_results("search", payload, md)
    print(md)


if __name__ == "__main__":
    main()
