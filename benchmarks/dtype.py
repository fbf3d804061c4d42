"""Compute dtype for quantized training: bf16 against fp32 compute on uniform 4-bit + LoRA r16, with the frontier
benchmark's final fine-tune (100 steps of 4×128 tokens, lr 3e-4, held-out loss on the whole test split), seeds
0, 1 and 2, each run through `qradaptor.train` in its own process (frontier.py's `run_final`).

Reports per dtype the mean step time of the training loop and the test loss (mean, spread over seeds); the
verdict of DESIGN's rule: the faster dtype becomes the default if its mean loss is within the other's seed
spread.

    .venv/bin/python benchmarks/dtype.py            # about 25 min on 2 cores
    .venv/bin/python benchmarks/dtype.py --smoke    # a tiny random model: keeps the script working

Resumable (per-run results under --work, default benchmarks/work/dtype). Writes results/dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, environment, markdown_table, write_results  # noqa: E402
from benchmarks.frontier import FINALS, FULL, SMOKE, children_in_process, run_final  # noqa: E402
from benchmarks.search import smoke_model  # noqa: E402

DTYPES = ("float32", "bfloat16")
SEEDS = (0, 1, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script, not the dtype")
    parser.add_argument("--work", type=Path, default=None, help="where each run is kept (resumable)")
    args = parser.parse_args(argv)
    from qradaptor.plan import Plan

    settings = SMOKE if args.smoke else FULL
    work = args.work or Path(__file__).resolve().parent / "work" / ("dtype-smoke" if args.smoke else "dtype")
    work.mkdir(parents=True, exist_ok=True)
    model = data = None
    if args.smoke:
        children_in_process()
        model, data = smoke_model(work) if not (work / "model").is_dir() else (str(work / "model"),
                                                                                str(work / "words.txt"))
    layers = 4 if args.smoke else 30
    plan = Plan.uniform(layers, 4, 16)
    store = work / "finals" if args.smoke else FINALS  # final fine-tunes shared with the other benchmarks
    runs = {d: [run_final(store, f"uniform4-{d}-s{seed}", plan, settings, model, data, seed=seed, dtype=d)
                for seed in SEEDS] for d in DTYPES}
    summary, rows = {}, []
    for d, results in runs.items():
        losses = [r["loss"] for r in results]
        step = statistics.mean(r["train_loop_seconds"] for r in results) / settings["steps"]
        summary[d] = {"losses": losses, "mean_loss": statistics.mean(losses), "spread": max(losses) - min(losses),
                      "step_seconds": step}
        rows.append([d, " / ".join(f"{x:.4f}" for x in losses), f"{summary[d]['mean_loss']:.4f}",
                     f"{summary[d]['spread']:.4f}", f"{step:.2f}"])
    fast, slow = sorted(DTYPES, key=lambda d: summary[d]["step_seconds"])
    gap = summary[fast]["mean_loss"] - summary[slow]["mean_loss"]
    within = abs(gap) <= max(summary[fast]["spread"], summary[slow]["spread"])
    verdict = {"faster": fast, "speedup": summary[slow]["step_seconds"] / summary[fast]["step_seconds"],
               "loss_gap": gap, "within_seed_spread": within, "default": fast if within else slow}
    payload = {"settings": {k: settings[k] for k in ("steps", "seq_len", "batch_size", "lr")}, "seeds": SEEDS,
               "dtypes": summary, "verdict": verdict, "environment": environment()}
    md = "\n".join([
        "# Compute dtype for quantized training", "",
        f"Uniform 4-bit (`hqq`, group 64) + LoRA r16, {settings['steps']} steps of {settings['batch_size']}×"
        f"{settings['seq_len']} tokens, lr {settings['lr']}, gradient checkpointing on, seeds {list(SEEDS)}; test loss "
        "on the whole test split; step time = the training loop's seconds / steps (mean over seeds). "
        "`benchmarks/dtype.py`.", "",
        markdown_table(["compute dtype", "test loss per seed", "mean", "spread (max − min)", "step s"], rows),
        f"{fast} is {verdict['speedup']:.2f}× faster per step; its mean loss is {gap:+.4f} against {slow} "
        f"({'within' if within else 'outside'} the seed spread), so the default is **{verdict['default']}**.", ""])
    where = work if args.smoke else RESULTS
    write_results("dtype", payload, md, where)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
