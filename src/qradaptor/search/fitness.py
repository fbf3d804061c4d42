"""What a plan is worth: a short LoRA fine-tune on the quantized base, then held-out loss."""

from __future__ import annotations

from typing import Callable

from ..backends import QuantCache, get_backend
from ..plan import Plan
from .config import Fidelity, SearchConfig

#: fitness(plan, fidelity) -> (held-out loss, fine-tune steps spent)
Fitness = Callable[[Plan, Fidelity], "tuple[float, int]"]


class FineTuneFitness:
    """The real objective: a short LoRA fine-tune of the plan on the quantized base, then held-out loss.
    Every plan sees the same data order (same seed), so differences come from the plan. ``device`` (default:
    where ``model`` is): where each plan is quantized and fine-tuned; the dense ``model`` stays where it is."""

    def __init__(self, model, tokenizer, *, data: str | None, config: SearchConfig, progress: bool = False,
                 device=None):
        from ..data import load_blocks

        self.model, self.config, self.progress, self.device = model, config, progress, device
        self.cache = QuantCache(get_backend(config.backend))
        self.train_blocks = load_blocks(data, tokenizer, "train", seq_len=config.seq_len, seed=config.seed)
        self.eval_blocks = load_blocks(data, tokenizer, "validation", seq_len=config.seq_len, seed=config.seed)

    def __call__(self, plan: Plan, fidelity: Fidelity) -> tuple[float, int]:
        from ..evaluate import evaluate_loss
        from ..quantize import prepare_model
        from ..train import TrainConfig, train

        model = prepare_model(self.model, plan, cache=self.cache, seed=self.config.seed, device=self.device)
        train(model, self.train_blocks, TrainConfig(steps=fidelity.steps, batch_size=fidelity.batch_size,
                                                    lr=fidelity.lr, warmup_steps=max(1, fidelity.steps // 10),
                                                    seed=self.config.seed,
                                                    gradient_checkpointing=self.config.gradient_checkpointing),
              progress=False)
        result = evaluate_loss(model, self.eval_blocks.subset(min(fidelity.eval_blocks, len(self.eval_blocks))),
                               progress=False)
        return result.loss, fidelity.steps
