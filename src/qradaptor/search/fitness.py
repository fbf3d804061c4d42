"""What a plan is worth: a short LoRA fine-tune on the quantized base, then held-out loss."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from ..backends import QuantCache, backend_for
from ..errors import ArtifactError
from ..plan import Plan
from ..rundir import DEFAULT_START_TOKENS
from .config import Fidelity, SearchConfig

log = logging.getLogger("qradaptor")

#: Written beside a kept prefix run (FineTuneFitness.trajectory(keep=...)): what it is the beginning of.
SNAPSHOT_FILE = "snapshot.json"
SNAPSHOT_FORMAT = "qradaptor-snapshot-1"
#: What a snapshot written before a setting existed meant by it (those runs all started their adapters at zero).
SNAPSHOT_DEFAULTS = {"adapter_init": "zero", "start_tokens": DEFAULT_START_TOKENS}
#: Where a search keeps its plans' prefix runs, under its --out: ``runs/<run_name(plan)>``.
RUNS_DIR = "runs"

#: fitness(plan, fidelity) -> (held-out loss, fine-tune steps spent)
Fitness = Callable[[Plan, Fidelity], "tuple[float, int]"]


def run_name(plan: Plan) -> str:
    """The directory name of ``plan``'s kept run: a digest of the plan (bits, rank, group of every layer)."""
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class FineTuneFitness:
    """The real objective: a short LoRA fine-tune of the plan on the quantized base, then held-out loss.
    Every plan sees the same data order (same seed), so differences come from the plan. ``device`` (default:
    where ``model`` is): where each plan is quantized and fine-tuned; the dense ``model`` stays where it is.
    The plans compute in ``model``'s dtype.

    ``runs``: a directory where each plan's prefix run is kept (fidelities with ``schedule_steps``; see
    `trajectory`). A later, longer fidelity of the same schedule continues a plan's kept run instead of starting
    over, and only the steps it adds count as spent; the chosen plan's kept run is where its final fine-tune
    (``qradaptor train --init-from``) continues. `prune` deletes the runs no longer worth keeping."""

    def __init__(self, model, tokenizer, *, data: str | None, config: SearchConfig, progress: bool = False,
                 device=None, runs: str | Path | None = None):
        from ..data import load_blocks

        self.model, self.data, self.config, self.progress, self.device = model, data, config, progress, device
        self.runs = Path(runs) if runs is not None else None
        # quantized layers compute (and keep scales and zeros) in the model's dtype, as `train` quantizes them
        self.cache = QuantCache(backend_for(model, config.backend))
        self.dtype = self.cache.backend.compute_dtype
        self.train_blocks = load_blocks(data, tokenizer, "train", seq_len=config.seq_len, seed=config.seed, model=model)
        self.eval_blocks = load_blocks(data, tokenizer, "validation", seq_len=config.seq_len, seed=config.seed,
                                       model=model)
        self._fingerprints: dict | None = None
        self._start = None  # the adapter starts (AdapterStart), fitted as plans need them

    def with_start(self, adapter_init: str) -> "FineTuneFitness":
        """This fitness with its plans' adapters started as ``adapter_init`` (itself when it already does): a copy
        sharing the model, the quantized layers and the data, with its own fitted starts and run fingerprints."""
        import copy
        import dataclasses

        if adapter_init == self.config.adapter_init:
            return self
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, adapter_init=adapter_init)
        other._start, other._fingerprints = None, None
        return other

    def __call__(self, plan: Plan, fidelity: Fidelity) -> tuple[float, int]:
        if fidelity.schedule_steps:
            keep = self.kept_run(plan)
            start = self._continuable(keep, plan, fidelity) if keep is not None else 0
            if keep is not None and start < 0:  # kept further along than asked: measure anew, keep the longer run
                keep, start = None, 0
            try:
                loss = self.trajectory(plan, fidelity, [fidelity.steps], keep=keep, start_from=keep if start else None)
            except ArtifactError as e:  # a kept run damaged on disk: it only saved time, so start over
                log.warning("search: the kept run %s is unreadable (%s); fine-tuning the plan from step 0", keep,
                            e.cause)
                shutil.rmtree(keep, ignore_errors=True)
                loss, start = self.trajectory(plan, fidelity, [fidelity.steps], keep=keep), 0
            return loss[fidelity.steps], fidelity.steps - start
        from ..evaluate import evaluate_loss
        from ..train import TrainConfig, train

        model = self._prepare(plan)
        train(model, self.train_blocks, TrainConfig(steps=fidelity.steps, batch_size=fidelity.batch_size,
                                                    lr=fidelity.lr, warmup_steps=max(1, fidelity.steps // 10),
                                                    seed=self.config.seed,
                                                    gradient_checkpointing=self.config.gradient_checkpointing),
              progress=False)
        return evaluate_loss(model, self._eval_blocks(fidelity), progress=False).loss, fidelity.steps

    def trajectory(self, plan: Plan, fidelity: Fidelity, at: list[int], *, keep=None,
                   start_from=None) -> dict[int, float]:
        """Held-out loss after each of the steps ``at`` of one fine-tune run on the schedule of a
        ``fidelity.schedule_steps``-step fine-tune (the final fine-tune's: `train`'s default warm-up, then cosine
        decay over all of its steps), stopped after the last of them: where the plan's final fine-tune passes.

        ``keep``: a directory to write the run's state into when it stops (adapter, optimizer, schedule; and in
        ``snapshot.json`` what it is the beginning of), which ``qradaptor train --init-from`` continues exactly.
        ``start_from``: such a directory (a kept run of this plan on this schedule) to continue from."""
        from ..evaluate import evaluate_loss
        from ..train import load_checkpoint, save_checkpoint, train

        if not fidelity.schedule_steps or max(at) > fidelity.schedule_steps:
            raise ValueError(f"steps {at} are not within a {fidelity.schedule_steps}-step schedule")
        model = self._prepare(plan)
        blocks, losses, last = self._eval_blocks(fidelity), {}, max(at)
        config = self._schedule(fidelity)
        state = load_checkpoint(model, start_from) if start_from is not None else None
        if state is not None and state.step > min(at):
            raise ValueError(f"the run in {start_from} is at step {state.step}, past step {min(at)}")

        def evaluate(step, result, snapshot) -> None:
            if step in at:
                losses[step] = evaluate_loss(model, blocks, progress=False).loss
                model.train()
            if keep is not None and step == last:
                save_checkpoint(model, keep, snapshot(), extra={SNAPSHOT_FILE: self.snapshot(plan, config, step)})

        train(model, self.train_blocks, config, progress=False, on_step=evaluate, stop_after=last, resume=state)
        if state is not None and state.step in at:  # asked for the step it starts at: nothing was trained
            losses[state.step] = evaluate_loss(model, blocks, progress=False).loss
        return losses

    def snapshot(self, plan: Plan, config, step: int) -> dict:
        """What a run kept at ``step`` is the beginning of: `train_plan` continues it only into that same run,
        and this fitness only into a longer prefix of it."""
        if self._fingerprints is None:  # hashing the model and the data once, not per plan
            from ..data import data_fingerprint
            from ..models import model_fingerprint

            self._fingerprints = {
                "model_fingerprint": model_fingerprint(self.model), "dtype": str(self.dtype).removeprefix("torch."),
                "backend": self.config.backend, "seq_len": self.config.seq_len,
                "adapter_init": self.config.adapter_init, "start_tokens": self.config.start_tokens,
                "data_fingerprint": data_fingerprint(self.data, "train", self.config.seq_len, seed=self.config.seed)}
        return {"format": SNAPSHOT_FORMAT, "step": step, "train_config": config.to_dict(), "plan": plan.to_dict(),
                **self._fingerprints}

    def kept_run(self, plan: Plan) -> Path | None:
        """Where ``plan``'s prefix run is kept (None: runs are not kept)."""
        return self.runs / run_name(plan) if self.runs is not None else None

    def kept_step(self, plan: Plan) -> int:
        """The step ``plan``'s kept run stopped at; 0 when there is none (or it is unreadable)."""
        info = self._read_snapshot(self.kept_run(plan)) if self.runs is not None else None
        return int(info["step"]) if info else 0

    def prune(self, keep: list[Plan]) -> None:
        """Delete every kept run but those of the plans in ``keep`` (half-written ones included)."""
        if self.runs is None or not self.runs.is_dir():
            return
        names = {run_name(p) for p in keep}
        for path in self.runs.iterdir():
            if path.name in names:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _schedule(self, fidelity: Fidelity):
        from ..train import TrainConfig

        return TrainConfig(steps=fidelity.schedule_steps, batch_size=fidelity.batch_size, lr=fidelity.lr,
                           seed=self.config.seed, gradient_checkpointing=self.config.gradient_checkpointing)

    @staticmethod
    def _read_snapshot(directory: Path | None) -> dict | None:
        from ..train import STATE_JSON

        try:
            info = json.loads((directory / SNAPSHOT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return None
        ok = (isinstance(info, dict) and info.get("format") == SNAPSHOT_FORMAT and isinstance(info.get("step"), int)
              and (directory / STATE_JSON).is_file())
        return info if ok else None

    def _continuable(self, directory: Path, plan: Plan, fidelity: Fidelity) -> int:
        """The step a kept run of this plan on this fidelity's schedule can be continued from: 0 when there is none
        to continue (missing, damaged, another run's), -1 when it is already past ``fidelity.steps``."""
        info = self._read_snapshot(directory)
        if info is None:
            return 0
        expected = self.snapshot(plan, self._schedule(fidelity), info["step"])
        if any(info.get(k, SNAPSHOT_DEFAULTS.get(k)) != v for k, v in expected.items()):
            return 0
        return info["step"] if info["step"] <= fidelity.steps else -1

    def prefit(self, plans: list[Plan]) -> int:
        """Quantize and fit now the adapter starts ``plans`` will need, every bit-width of them in one calibration
        forward (a search's first plans; the same fits their trials would make one by one). Returns how many
        linears were fitted (0 with the zero start)."""
        if self.config.adapter_init == "zero":
            return 0
        return self._starter().prefit(plans)

    def _starter(self):
        """The adapter starts, fitted once per (module, bits) at the largest rank and shared by every plan."""
        from ..adapter_init import AdapterStart, calibration_subset

        if self._start is None:
            self._start = AdapterStart(self.model, self.config.adapter_init, self.cache,
                                       blocks=calibration_subset(self.train_blocks, self.config.start_tokens),
                                       max_rank=max(self.config.ranks))
        return self._start

    def _prepare(self, plan: Plan):
        from ..adapter_init import apply_start
        from ..quantize import prepare_model

        model = prepare_model(self.model, plan, cache=self.cache, seed=self.config.seed, device=self.device)
        if self.config.adapter_init != "zero":
            apply_start(model, self._starter().factors(plan))
        return model

    def _eval_blocks(self, fidelity: Fidelity):
        return self.eval_blocks.subset(min(fidelity.eval_blocks, len(self.eval_blocks)))
