"""LoRA fine-tuning on a quantized base: AdamW, linear warm-up then cosine decay, gradient
accumulation, a fixed seed for the data order and adapter initialisation (same seed → same losses)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .evaluate import evaluate_loss, token_nll


@dataclass
class TrainConfig:
    steps: int = 60  # optimizer steps
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: no periodic evaluation

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    losses: list[float]  # training loss per optimizer step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return factor


def batch_order(num_blocks: int, batch_size: int, num_batches: int, seed: int) -> list[torch.Tensor]:
    """Indices of each micro-batch: seeded permutations of the blocks, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    needed = num_batches * batch_size
    while len(order) < needed:
        order.extend(torch.randperm(num_blocks, generator=gen).tolist())
    return [torch.tensor(order[i * batch_size : (i + 1) * batch_size]) for i in range(num_batches)]


def train(model, train_blocks, config: TrainConfig | None = None, *, eval_blocks=None, progress: bool = True,
          desc: str = "train") -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of ``model`` on ``train_blocks`` in place."""
    config = config or TrainConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach adapters first (qradaptor.quantize.add_adapters)")
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    batches = batch_order(len(train_blocks), config.batch_size, config.steps * config.grad_accum, config.seed)
    result = TrainResult(losses=[])
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        step_nll, step_tokens = 0.0, 0
        micro = batches[step * config.grad_accum : (step + 1) * config.grad_accum]
        tokens = [int((train_blocks.labels[idx][:, 1:] != -100).sum()) for idx in micro]
        for idx, n in zip(micro, tokens):
            nll, _ = token_nll(model, train_blocks.input_ids[idx], train_blocks.labels[idx])
            # Normalise by the step's token count so accumulation equals one big batch.
            (nll / max(sum(tokens), 1)).backward()
            step_nll += float(nll.detach())
            step_tokens += n
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_nll / max(step_tokens, 1))
        postfix = {"loss": f"{result.losses[-1]:.3f}"}
        if eval_blocks is not None and config.eval_every and (step + 1) % config.eval_every == 0:
            ev = evaluate_loss(model, eval_blocks, progress=False)
            result.evals.append((step + 1, ev.loss))
            postfix["val"] = f"{ev.loss:.3f}"
            model.train()
        bar.set_postfix(postfix)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
