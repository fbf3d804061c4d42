"""What a plan is worth: a short LoRA fine-tune on the quantized base, then held-out loss."""

from __future__ import annotations

from typing import Callable

from ..backends import QuantCache, get_backend
from ..plan import Plan
from .config import Fidelity, SearchConfig

#: Written beside a kept prefix run (FineTuneFitness.trajectory(keep=...)): what it is the beginning of.
SNAPSHOT_FILE = "snapshot.json"
SNAPSHOT_FORMAT = "qradaptor-snapshot-1"

#: fitness(plan, fidelity) -> (held-out loss, fine-tune steps spent)
Fitness = Callable[[Plan, Fidelity], "tuple[float, int]"]


class FineTuneFitness:
    """The real objective: a short LoRA fine-tune of the plan on the quantized base, then held-out loss.
    Every plan sees the same data order (same seed), so differences come from the plan. ``device`` (default:
    where ``model`` is): where each plan is quantized and fine-tuned; the dense ``model`` stays where it is.
    The plans compute in ``model``'s dtype."""

    def __init__(self, model, tokenizer, *, data: str | None, config: SearchConfig, progress: bool = False,
                 device=None):
        from ..data import load_blocks

        self.model, self.data, self.config, self.progress, self.device = model, data, config, progress, device
        # quantized layers compute (and keep scales and zeros) in the model's dtype, as `train` quantizes them
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.cache = QuantCache(get_backend(config.backend, **({"compute_dtype": dtype} if dtype else {})))
        self.train_blocks = load_blocks(data, tokenizer, "train", seq_len=config.seq_len, seed=config.seed)
        self.eval_blocks = load_blocks(data, tokenizer, "validation", seq_len=config.seq_len, seed=config.seed)

    def __call__(self, plan: Plan, fidelity: Fidelity) -> tuple[float, int]:
        if fidelity.schedule_steps:
            return self.trajectory(plan, fidelity, [fidelity.steps])[fidelity.steps], fidelity.steps
        from ..evaluate import evaluate_loss
        from ..train import TrainConfig, train

        model = self._prepare(plan)
        train(model, self.train_blocks, TrainConfig(steps=fidelity.steps, batch_size=fidelity.batch_size,
                                                    lr=fidelity.lr, warmup_steps=max(1, fidelity.steps // 10),
                                                    seed=self.config.seed,
                                                    gradient_checkpointing=self.config.gradient_checkpointing),
              progress=False)
        return evaluate_loss(model, self._eval_blocks(fidelity), progress=False).loss, fidelity.steps

    def trajectory(self, plan: Plan, fidelity: Fidelity, at: list[int], *, keep=None) -> dict[int, float]:
        """Held-out loss after each of the steps ``at`` of one fine-tune run on the schedule of a
        ``fidelity.schedule_steps``-step fine-tune (the final fine-tune's: `train`'s default warm-up, then cosine
        decay over all of its steps), stopped after the last of them: where the plan's final fine-tune passes.

        ``keep``: a directory to write the run's state into when it stops (adapter, optimizer, schedule; and in
        ``snapshot.json`` what it is the beginning of), which ``qradaptor train --init-from`` continues exactly."""
        from ..evaluate import evaluate_loss
        from ..train import TrainConfig, save_checkpoint, train

        if not fidelity.schedule_steps or max(at) > fidelity.schedule_steps:
            raise ValueError(f"steps {at} are not within a {fidelity.schedule_steps}-step schedule")
        model = self._prepare(plan)
        blocks, losses, last = self._eval_blocks(fidelity), {}, max(at)
        config = TrainConfig(steps=fidelity.schedule_steps, batch_size=fidelity.batch_size, lr=fidelity.lr,
                             seed=self.config.seed, gradient_checkpointing=self.config.gradient_checkpointing)

        def evaluate(step, result, snapshot) -> None:
            if step in at:
                losses[step] = evaluate_loss(model, blocks, progress=False).loss
                model.train()
            if keep is not None and step == last:
                save_checkpoint(model, keep, snapshot())

        train(model, self.train_blocks, config, progress=False, on_step=evaluate, stop_after=last)
        if keep is not None:
            self._describe_snapshot(keep, plan, config, last)
        return losses

    def _describe_snapshot(self, directory, plan: Plan, config, step: int) -> None:
        """What a kept run is the beginning of: `train_plan` continues it only into that same run."""
        from pathlib import Path

        from ..data import data_fingerprint
        from ..io import atomic_write_json
        from ..models import model_fingerprint

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        atomic_write_json(Path(directory) / SNAPSHOT_FILE, {
            "format": SNAPSHOT_FORMAT, "step": step, "train_config": config.to_dict(), "plan": plan.to_dict(),
            "model_fingerprint": model_fingerprint(self.model), "dtype": str(dtype).removeprefix("torch."),
            "backend": self.config.backend, "seq_len": self.config.seq_len,
            "data_fingerprint": data_fingerprint(self.data, "train", self.config.seq_len, seed=self.config.seed)})

    def _prepare(self, plan: Plan):
        from ..quantize import prepare_model

        return prepare_model(self.model, plan, cache=self.cache, seed=self.config.seed, device=self.device)

    def _eval_blocks(self, fidelity: Fidelity):
        return self.eval_blocks.subset(min(fidelity.eval_blocks, len(self.eval_blocks)))
