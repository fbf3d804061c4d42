"""The layout of a training run directory (``qradaptor train --out DIR``), its settings and its record.

Written by `qradaptor.commands.train.train_plan`; read by export, load, evaluate and ``run``, which need to know
what a run holds without importing the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ArtifactError
from .io import read_text

# A run directory (``qradaptor train --out DIR``):
#   run.json        resolved config, seed, package versions, model and data fingerprints, status
#   plan.json       the plan trained
#   train.log       what the run logged
#   checkpoints/step-NNNNNN/   the latest checkpoint (see above)
#   adapter/        the final adapter (PEFT save_pretrained), written when training finishes
#   metrics.json    losses, periodic and final validation loss, memory
RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
RUN_FORMAT = 1


@dataclass
class RunConfig:
    """Every setting of a training run, resolved (written to run.json; a resume must match it)."""

    model: str = "smollm2-135m"
    data: str = "pydoc-topics"
    steps: int | None = None  # optimizer steps; resolved from ``epochs`` when that is given
    epochs: float | None = None
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    backend: str = "hqq"
    # "auto": bf16 where the device computes it fast (1.9x faster per step than fp32 on a CPU with AVX512-BF16, loss
    # within the fp32 seeds' spread, benchmarks/results/dtype.md; half the activation memory), fp32 elsewhere
    # (precision.default_dtype). run.json records the resolved dtype.
    dtype: str = "auto"
    eval_every: int | None = None  # None: 5 validations over the run; 0: none
    eval_blocks: int = 16  # validation blocks (0: no validation)
    checkpoint_every: int | None = None  # None: 10 checkpoints over the run
    max_train_blocks: int | None = None
    gradient_checkpointing: bool = True
    device: str = "auto"  # auto: a CUDA GPU when PyTorch sees one, else the CPU (qradaptor.device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunConfig":
        """A run.json's settings over the defaults (a setting added after the run was written takes its default).
        Raises TypeError on a key this version does not know."""
        return cls(**{**cls().to_dict(), **saved})


def package_versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("qradaptor", "torch", "transformers", "peft", "hqq", "safetensors", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def read_run(out: str | Path) -> dict | None:
    """The run.json of a run directory, or None when ``out`` holds no run."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(read_text(path, ArtifactError, "run file"))
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})", "the run directory is damaged; start a new run in "
                            "another --out directory") from None
    if not isinstance(run, dict) or not all(isinstance(run.get(k), dict) for k in ("config", "plan")):
        raise ArtifactError(f"{path} is not a qradaptor run record (no 'config' and 'plan' objects)",
                            "the run directory is damaged; start a new run in another --out directory")
    return run
