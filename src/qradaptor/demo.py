"""The demo: the embedded default model and data, two plans of about the same memory, each fine-tuned
briefly, compared on held-out loss. It shows the whole path a plan takes (quantize, adapters, train,
evaluate, measure memory) in a few minutes on a laptop CPU.

The mixed plan is made by hand, not searched: the first and last decoder layers get 8 bits and as
many middle layers as needed drop to 3 bits until the plan fits the memory of uniform 4-bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends import get_backend
from .data import load_blocks
from .evaluate import evaluate_loss
from .io import atomic_write_json
from .memory import ModelShapes, measured_bytes, predict
from .models import DEFAULT_MODEL, load_model, model_fingerprint
from .plan import DEFAULT_RANK, LayerChoice, Plan
from .quantize import prepare_model
from .train import TrainConfig, train

log = logging.getLogger("qradaptor")


@dataclass
class DemoRow:
    name: str
    plan: Plan | None
    predicted_bytes: int
    measured_bytes: int
    avg_bits: float
    loss_before: float
    loss_after: float | None
    train_seconds: float = 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "plan"}
        d["plan"] = None if self.plan is None else self.plan.to_dict()
        return d


@dataclass
class DemoResult:
    rows: list[DemoRow]
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'plan':<16} {'memory (MiB)':>12} {'avg bits':>9} {'loss before':>12} {'loss after':>11}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            after = "—" if r.loss_after is None else f"{r.loss_after:.4f}"
            lines.append(f"{r.name:<16} {r.measured_bytes / 2**20:>12.2f} {r.avg_bits:>9.2f} "
                         f"{r.loss_before:>12.4f} {after:>11}")
        return "\n".join(lines)


def mixed_plan(shapes: ModelShapes, backend, budget_bytes: int, *, rank: int = DEFAULT_RANK,
               group_size: int = 64) -> Plan:
    """First and last layers at 8 bits, then middle layers (from the centre outwards) at 3 bits until the
    plan's memory is within ``budget_bytes``."""
    n = shapes.num_layers
    bits = [4] * n
    bits[0] = bits[-1] = 8
    centre = sorted(range(1, n - 1), key=lambda i: abs(i - (n - 1) / 2))
    plan = Plan([LayerChoice(b, rank) for b in bits], group_size=group_size)
    for i in centre:
        if predict(shapes, plan, backend).total_bytes <= budget_bytes:
            break
        bits[i] = 3
        plan = Plan([LayerChoice(b, rank) for b in bits], group_size=group_size)
    return plan


def run_demo(*, model: str | None = None, steps: int = 25, batch_size: int = 4, seq_len: int = 256,
             eval_blocks: int = 16, lr: float = 3e-4, seed: int = 0, backend: str = "hqq",
             out: str | Path | None = None, progress: bool = True) -> DemoResult:
    """Fine-tune uniform 4-bit and a hand-made mixed plan of about the same memory; return the table."""
    t0 = time.perf_counter()
    base, tokenizer = load_model(model)
    quant = get_backend(backend)
    shapes = ModelShapes.from_model(base)
    train_blocks = load_blocks(None, tokenizer, "train", seq_len=seq_len)
    held_out = load_blocks(None, tokenizer, "validation", seq_len=seq_len, max_blocks=eval_blocks)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10), seed=seed)

    uniform = Plan.uniform(shapes.num_layers, 4, DEFAULT_RANK)
    budget = predict(shapes, uniform, quant).total_bytes
    plans = [("uniform 4-bit", uniform), ("mixed 3/4/8-bit", mixed_plan(shapes, quant, budget))]

    full = evaluate_loss(base, held_out, progress=progress, desc="evaluate full precision")
    full_bytes = measured_bytes(base)
    rows = [DemoRow("full precision", None, full_bytes, full_bytes, float(torch.finfo(base.dtype).bits),
                    full.loss, None)]
    for name, plan in plans:
        log.info("%s: %s", name, plan.describe())
        tuned = prepare_model(base, plan, quant, seed=seed)
        report = predict(shapes, plan, quant)
        before = evaluate_loss(tuned, held_out, progress=progress, desc=f"evaluate {name}")
        result = train(tuned, train_blocks, config, progress=progress, desc=f"train {name}")
        after = evaluate_loss(tuned, held_out, progress=progress, desc=f"evaluate {name}")
        rows.append(DemoRow(name, plan, report.total_bytes, measured_bytes(tuned), report.avg_bits, before.loss,
                            after.loss, result.seconds))
        del tuned
    settings = {
        "model": model or DEFAULT_MODEL,
        "model_fingerprint": model_fingerprint(base),
        "backend": backend,
        "group_size": 64,
        "train": config.to_dict(),
        "seq_len": seq_len,
        "eval_tokens": held_out.num_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result = DemoResult(rows, settings)
    if out is not None:
        out = Path(out)
        for name, plan in plans:
            plan.save(out / f"plan-{name.split()[0]}.json")
        atomic_write_json(out / "demo.json", {"rows": [r.to_dict() for r in rows], "settings": settings})
    return result
