"""Held-out loss and perplexity with our own loop: one forward per batch of packed blocks, the mean
next-token loss over every position that has a label."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((target != -100).sum())


@torch.no_grad()
def evaluate_loss(model, blocks, *, batch_size: int = 8, progress: bool = True, desc: str = "evaluate") -> EvalResult:
    """Mean held-out loss over ``blocks`` (a ``qradaptor.data.TokenBlocks``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        nll, n = token_nll(model, blocks.input_ids[start : start + batch_size], blocks.labels[start : start + batch_size])
        total += float(nll)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count)


def evaluate_model(model: str | None = None, *, data: str | None = None, split: str = "validation",
                   plan=None, backend: str = "hqq", seq_len: int = 256, max_blocks: int | None = None,
                   batch_size: int = 8, progress: bool = True) -> dict:
    """What ``qradaptor evaluate`` prints: held-out loss and perplexity of ``model`` (quantized per
    ``plan`` when one is given, adapters untrained) on ``split`` of ``data``.

    ``model`` may also be a training run directory or an exported directory (quantized base + trained
    adapter, loaded with `qradaptor.export.load_artifact`); then ``plan`` must be None (the artifact has one).
    """
    from .data import load_blocks
    from .errors import ArtifactError
    from .export import artifact_kind, load_artifact
    from .models import load_model
    from .plan import Plan
    from .quantize import quantize_model

    kind = artifact_kind(model) if model is not None and os.path.isdir(model) else None
    if kind is not None:
        if plan is not None:
            raise ArtifactError(f"{model} is a trained {'export' if kind == 'export' else 'run'} that has its own plan, "
                                "so --plan does not apply", "drop --plan")
        base, tokenizer = load_artifact(model)
    else:
        base, tokenizer = load_model(model)
    blocks = load_blocks(data, tokenizer, split, seq_len=seq_len, max_blocks=max_blocks)
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        base = quantize_model(base, plan, backend, inplace=True)
    result = evaluate_loss(base, blocks, batch_size=batch_size, progress=progress)
    if kind is not None:
        plan = getattr(base, "qradaptor_plan", None)
    return {**result.to_dict(), "split": split, "blocks": len(blocks), "seq_len": seq_len,
            "plan": None if plan is None else plan.describe(), "artifact": kind}
