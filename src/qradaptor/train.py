"""LoRA fine-tuning on a quantized base: AdamW, linear warm-up then cosine decay, gradient
accumulation, a fixed seed for the data order and adapter initialisation (same seed → same losses)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import ArtifactError, TrainingError, first_line
from .evaluate import evaluate_loss, token_nll
from .io import atomic_save_safetensors, atomic_write_json, read_text
from .memory import release_free_memory
from .threads import rebalance


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
    # Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant).
    gradient_checkpointing: bool = True

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


@dataclass
class TrainState:
    """Where training stands after ``step`` optimizer steps: with the adapter weights, enough to continue
    exactly (same losses as an uninterrupted run)."""

    step: int
    losses: list[float]
    evals: list[tuple[int, float]]
    optimizer: dict  # optimizer.state_dict()
    scheduler: dict  # scheduler.state_dict()
    rng: torch.Tensor  # torch.get_rng_state()


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return factor


def _diverged(step: int, what: str, config: TrainConfig) -> TrainingError:
    return TrainingError(f"training diverged at step {step}: {what} (learning rate {config.lr:g})",
                         "train again with a lower --lr (e.g. half of it); a float32 --dtype also helps when "
                         "bfloat16 overflows")


def batch_order(num_blocks: int, batch_size: int, num_batches: int, seed: int) -> list[torch.Tensor]:
    """Indices of each micro-batch: seeded permutations of the blocks, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    needed = num_batches * batch_size
    while len(order) < needed:
        order.extend(torch.randperm(num_blocks, generator=gen).tolist())
    return [torch.tensor(order[i * batch_size : (i + 1) * batch_size]) for i in range(num_batches)]


def train(model, train_blocks, config: TrainConfig | None = None, *, eval_blocks=None, progress: bool = True,
          desc: str = "train", resume: "TrainState | None" = None,
          on_step: "Callable[[int, TrainResult, Callable[[], TrainState]], None] | None" = None,
          stop_after: int | None = None) -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of ``model`` on ``train_blocks`` in place.

    ``stop_after``: stop once that many steps are done, on the schedule of the whole ``config.steps`` run (the
    first steps of the longer run, which ``resume`` from a snapshot taken then continues exactly).

    Checkpoint hooks: ``on_step(step, result, snapshot)`` runs after every optimizer step (``step`` steps
    done); ``snapshot()`` returns a `TrainState` (optimizer, scheduler, RNG, losses so far) to save.
    ``resume`` continues from such a state; the caller has already loaded the adapter weights saved
    with it. A resumed run computes exactly the losses the uninterrupted run would have.
    """
    config = config or TrainConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach adapters first (qradaptor.quantize.add_adapters)")
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    batches = batch_order(len(train_blocks), config.batch_size, config.steps * config.grad_accum, config.seed)
    result = TrainResult(losses=[])
    first = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.rng)
        result = TrainResult(losses=list(resume.losses), evals=[tuple(e) for e in resume.evals])
        first = resume.step

    def snapshot() -> TrainState:
        return TrainState(step=len(result.losses), losses=list(result.losses), evals=list(result.evals),
                          optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=torch.get_rng_state())

    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
    if config.gradient_checkpointing:
        # Non-reentrant: works with frozen quantized layers and inputs that need no gradient (no
        # enable_input_require_grads hack), and the recomputation is exact (LoRA dropout is 0 by default).
        transformer.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    release_free_memory()  # what building the model freed: the training peak starts from the live tensors
    start = time.perf_counter()
    try:
        model.train()
        last = config.steps if stop_after is None else min(stop_after, config.steps)
        bar = tqdm(range(first, last), desc=desc, disable=not progress, unit="step", total=last,
                   initial=first)
        for step in bar:
            rebalance()  # this process's share of the cores, when other qradaptor processes came or went
            step_nll, step_tokens = 0.0, 0
            micro = batches[step * config.grad_accum : (step + 1) * config.grad_accum]
            tokens = [int((train_blocks.labels[idx][:, 1:] != -100).sum()) for idx in micro]
            for idx, n in zip(micro, tokens):
                nll, _ = token_nll(model, train_blocks.input_ids[idx], train_blocks.labels[idx])
                # Normalise by the step's token count so accumulation equals one big batch.
                (nll / max(sum(tokens), 1)).backward()
                step_nll += float(nll.detach())
                step_tokens += n
            # A non-finite loss or update poisons every later step: stop before it is applied or saved.
            if not math.isfinite(step_nll):
                raise _diverged(step + 1, f"the training loss is {step_nll}", config)
            if config.max_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                if not torch.isfinite(norm):
                    raise _diverged(step + 1, "the gradient is not finite", config)
            optimizer.step()
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise _diverged(step + 1, "the adapter weights are no longer finite after the update", config)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            release_free_memory()
            result.losses.append(step_nll / max(step_tokens, 1))
            postfix = {"loss": f"{result.losses[-1]:.3f}"}
            if eval_blocks is not None and config.eval_every and (step + 1) % config.eval_every == 0:
                ev = evaluate_loss(model, eval_blocks, progress=False)
                result.evals.append((step + 1, ev.loss))
                postfix["val"] = f"{ev.loss:.3f}"
                model.train()
            bar.set_postfix(postfix)
            if on_step is not None:
                on_step(step + 1, result, snapshot)
    finally:
        model.eval()
        if config.gradient_checkpointing:
            transformer.activation_checkpointing_disable()
    result.seconds = time.perf_counter() - start
    return result


# ============================================================================ checkpoint files
# A checkpoint is a directory written atomically (temporary name, then rename): the adapter as PEFT saves
# it (adapter_model.safetensors + adapter_config.json), the optimizer's tensors and the RNG state in
# optimizer.safetensors, everything else (step, losses, optimizer hyper-parameters, scheduler) in
# trainer_state.json. Nothing is pickled, so nothing a user hands us is unpickled on resume.
STATE_TENSORS = "optimizer.safetensors"
STATE_JSON = "trainer_state.json"
_STATE_FORMAT = 1


def save_train_state(state: TrainState, directory: str | Path) -> None:
    """Write ``state`` into ``directory`` as safetensors + JSON."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {"rng": state.rng}
    other: dict[str, dict] = {}
    for idx, entries in state.optimizer["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().clone()
            else:
                other.setdefault(str(idx), {})[key] = value
    atomic_save_safetensors(directory / STATE_TENSORS, tensors)
    atomic_write_json(directory / STATE_JSON, {
        "format": _STATE_FORMAT, "step": state.step, "losses": state.losses, "evals": [list(e) for e in state.evals],
        "param_groups": state.optimizer["param_groups"], "optimizer_other": other, "scheduler": state.scheduler,
    })


def load_train_state(directory: str | Path) -> TrainState:
    """Read what `save_train_state` wrote (safetensors + JSON only)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    damaged = (f"delete {directory} and rerun with --resume to start again from step 0, or start a new run in "
               "another --out directory")
    try:
        meta = json.loads(read_text(directory / STATE_JSON, ArtifactError, "checkpoint file"))
        tensors = load_file(directory / STATE_TENSORS)
    except ArtifactError as e:
        raise ArtifactError(e.cause, damaged) from None
    except Exception as e:  # OSError, JSON errors, safetensors' SafetensorError (truncated or garbage file)
        raise ArtifactError(f"checkpoint {directory} is unreadable ({first_line(e)})", damaged) from None
    if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"checkpoint {directory} has format {found!r}, expected {_STATE_FORMAT}",
                            "resume it with the qradaptor version that wrote it, or " + damaged)
    try:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, entries in meta["optimizer_other"].items():
            state.setdefault(int(idx), {}).update(entries)
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
        return TrainState(step=int(meta["step"]), losses=[float(v) for v in meta["losses"]],
                          evals=[tuple(e) for e in meta["evals"]], optimizer={"state": state, "param_groups": groups},
                          scheduler=dict(meta["scheduler"]), rng=tensors["rng"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"checkpoint {directory}: {STATE_JSON} or {STATE_TENSORS} lacks or mangles {e}",
                            damaged) from None


def save_checkpoint(model, directory: str | Path, state: TrainState, *, extra: dict[str, dict] | None = None) -> Path:
    """Write the adapter of ``model`` (as PEFT saves it) and ``state`` into ``directory``, atomically; ``extra``:
    JSON files (name → object) written with them, so they are never out of step with the checkpoint."""
    from .io import AtomicDirectory

    directory = Path(directory)
    with AtomicDirectory(directory) as tmp:
        model.save_pretrained(tmp)
        save_train_state(state, tmp)
        for name, obj in (extra or {}).items():
            atomic_write_json(tmp / name, obj)
    return directory


def load_checkpoint(model, directory: str | Path) -> TrainState:
    """Load a `save_checkpoint` directory: its adapter weights into ``model`` (which must have the same
    adapters), and return its training state for ``train(..., resume=state)``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    state = load_train_state(directory)
    try:
        weights = load_file(directory / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
    except Exception as e:  # truncated or garbage file, or tensors of the wrong shape
        raise ArtifactError(f"checkpoint {directory}: its adapter is unreadable ({first_line(e)})",
                            f"delete {directory} and rerun with --resume to start again from step 0, or start a new "
                            "run in another --out directory") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"checkpoint {directory} does not match the model's adapters "
                            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors)",
                            "resume with the plan the run started with, or start a new run")
    return state
