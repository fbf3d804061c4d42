"""What a `gguf:` budget changes in the plan a search chooses (issue #30), on SmolLM2-135M.

Two searches with the same settings, profile and seed: one within the `4bit` budget on the stored model (the bytes of
uniform 4-bit r16 as qradaptor stores it), one within `gguf:` the bytes of uniform 4-bit r16's GGUF files
(model.gguf + adapter.gguf as `export --gguf` writes them). For each chosen plan: its bit-widths and ranks, its
stored bytes and its GGUF bytes (both predicted exactly), and the search's own loss for it (its full fidelity).

Search settings are the frontier's (8 trials, population 4, one promotion, one refinement, 4/8-step fidelities of
4×128 tokens, bf16) on a smaller profile (1,024 calibration tokens): both searches share it, so the comparison is
between budgets, not profiles. Work is kept in --work (a finished search is reloaded).

Usage: python benchmarks/gguf_budget.py [--work DIR]   (results: benchmarks/results/gguf_budget.{json,md}; ~15 min)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import describe_cpu, environment, markdown_table, write_results  # noqa: E402

SEARCH = {"trials": 8, "population": 4, "promote": 1, "refine": 1, "warm_start": 2, "seq_len": 128, "seed": 0,
          "cheap": {"name": "cheap", "steps": 4, "eval_blocks": 8, "batch_size": 4},
          "full": {"name": "full", "steps": 8, "eval_blocks": 16, "batch_size": 4}}
DTYPE = "bfloat16"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "gguf_budget")
    args = parser.parse_args(argv)
    import torch

    from qradaptor.backends import get_backend
    from qradaptor.commands import profile, search
    from qradaptor.gguf_export import predict_gguf
    from qradaptor.memory import ModelShapes, meta_model, predict
    from qradaptor.models import load_config
    from qradaptor.plan import Plan

    sensitivity = args.work / "profile" / "sensitivity.json"
    if not sensitivity.is_file():
        profile(None, out=sensitivity.parent, tokens=1024, seq_len=128, dtype=DTYPE, progress=False)
    meta, backend = meta_model(load_config(None)), get_backend("hqq", compute_dtype=torch.bfloat16)
    shapes = ModelShapes.from_model(meta)

    def sizes(plan: Plan) -> tuple[int, int]:
        return (predict(shapes, plan, backend).total_bytes,
                predict_gguf(meta, plan, backend, spec=None, dtype=torch.bfloat16).total_bytes)

    reference = Plan.uniform(30, 4, 16)
    stored_ref, gguf_ref = sizes(reference)
    budgets = {"4bit (stored)": "4bit", f"gguf:{gguf_ref} (GGUF files)": f"gguf:{gguf_ref}"}
    cases = []
    for name, budget in budgets.items():
        result = search(None, budget=budget, out=args.work / name.split(" ")[0].replace(":", "-"), progress=False,
                        sensitivity=str(sensitivity), dtype=DTYPE, **SEARCH)
        plan = result.chosen.plan
        stored, gguf = sizes(plan)
        cases.append({"budget": name, "budget_bytes": result.budget_bytes, "plan": plan.describe(),
                      "bits": dict(sorted(Counter(plan.bits).items())), "ranks": dict(sorted(Counter(plan.ranks).items())),
                      "stored_bytes": stored, "gguf_bytes": gguf, "search_loss": result.chosen.loss,
                      "fidelity": result.chosen.fidelity,
                      "layers": [{"bits": c.bits, "rank": c.rank} for c in plan.layers]})
        print(cases[-1]["budget"], cases[-1]["plan"], stored, gguf, result.chosen.loss, flush=True)

    env = environment()
    mib = 2 ** 20
    rows = [[c["budget"], c["plan"], f"{c['budget_bytes'] / mib:.1f} MiB", f"{c['stored_bytes'] / mib:.1f} MiB",
             f"{c['gguf_bytes'] / mib:.1f} MiB", f"{c['search_loss']:.4f} ({c['fidelity']})"] for c in cases]
    md = (f"# What a gguf: budget changes in the chosen plan\n\nSmolLM2-135M, {describe_cpu(env)}. Two searches, the "
          f"same settings (8 trials, population 4, 4- and 8-step fidelities of 4×128 tokens, bf16, seed 0) and "
          f"profile (1,024 tokens): within the stored bytes of uniform 4-bit r16 ({stored_ref / mib:.1f} MiB, the "
          f"`4bit` budget), and within the bytes of its GGUF files ({gguf_ref / mib:.1f} MiB). Stored and GGUF "
          "bytes of each chosen plan as `memory` predicts them (exact: tests/test_gguf.py); search loss: the "
          "search's own measurement of its choice.\n\n"
          + markdown_table(["budget", "chosen plan", "budget", "stored", "GGUF files", "search loss"], rows))
    write_results("gguf_budget", {"cases": cases, "reference": {"stored_bytes": stored_ref, "gguf_bytes": gguf_ref},
                                  "settings": {**SEARCH, "dtype": DTYPE, "profile_tokens": 1024}, "environment": env}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
