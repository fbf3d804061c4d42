"""What a plan's GGUF files take against its stored bytes (issue #30 item 2), on SmolLM2-135M-Instruct.

For uniform plans at every bit-width (rank 16) and the committed frontier's `3.5bit` and `4bit` plans, in each
training dtype: the stored bytes (`memory.predict`, what the budgets in bits and bytes bound) and the bytes of
``model.gguf`` + ``adapter.gguf`` as ``export --gguf`` writes them (`gguf_export.predict_gguf`, exact to the byte:
tests/test_gguf.py compares it with written files). From shapes alone: seconds, no training.

    .venv/bin/python benchmarks/gguf_sizes.py

Writes benchmarks/results/gguf_sizes.{json,md}.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, environment, markdown_table, write_results  # noqa: E402


def plans(layers: int) -> list[tuple[str, object]]:
    from qradaptor.plan import Plan

    out = [(f"uniform{b}-r16", Plan.uniform(layers, b, 16)) for b in (2, 3, 4, 5, 6, 8, 16)]
    frontier = RESULTS / "frontier.json"
    if frontier.is_file():
        for row in json.loads(frontier.read_text())["methods"]:
            if row["name"] in ("qradaptor-3.5bit", "qradaptor-4bit"):
                out.append((row["name"], Plan.from_dict({"layers": row["plan_layers"]})))
    return out


def main() -> None:
    import torch

    from qradaptor.backends import get_backend
    from qradaptor.gguf_export import predict_gguf
    from qradaptor.memory import ModelShapes, meta_model, predict
    from qradaptor.models import load_config

    meta = meta_model(load_config(None))
    shapes = ModelShapes.from_model(meta)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        backend = get_backend("hqq", compute_dtype=dtype)
        for name, plan in plans(shapes.num_layers):
            stored = predict(shapes, plan, backend).total_bytes
            size = predict_gguf(meta, plan, backend, spec=None, dtype=dtype)
            rows.append({"plan": name, "describe": plan.describe(), "dtype": str(dtype).removeprefix("torch."),
                         "stored_bytes": stored, **size.to_dict(), "ratio": size.total_bytes / stored})
    mib = 2**20
    md = ("# GGUF files against stored bytes\n\nSmolLM2-135M-Instruct (tied embeddings), HQQ group 64. Stored: what "
          "`qradaptor memory` predicts and the budgets in bits and bytes bound (codes, bf16/fp32 scales and zeros, "
          "fp32 adapters, every other tensor in the dtype). GGUF: `model.gguf` + `adapter.gguf` as `export --gguf` "
          "writes them (2–4-bit linears as Q4_1, 5-bit as Q5_1, 6–8-bit as Q8_0, 16-bit and the embeddings in the "
          "dtype, F32 adapters, the tokenizer in the header), predicted exactly.\n\n")
    md += markdown_table(
        ["plan", "dtype", "stored MiB", "model.gguf MiB", "adapter.gguf MiB", "GGUF MiB", "GGUF / stored", "types"],
        [[r["plan"], r["dtype"], f"{r['stored_bytes'] / mib:.2f}", f"{r['model_bytes'] / mib:.2f}",
          f"{r['adapter_bytes'] / mib:.2f}", f"{r['total_bytes'] / mib:.2f}", f"{r['ratio']:.3f}",
          ", ".join(f"{k} ×{n}" for k, n in r["types"].items())] for r in rows])
    write_results("gguf_sizes", {"rows": rows, "environment": environment()}, md)
    print(md)


if __name__ == "__main__":
    main()
