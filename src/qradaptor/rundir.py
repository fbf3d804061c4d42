"""The layout of a training run directory (``qradaptor train --out DIR``), its settings and its record.

Written by `qradaptor.commands.train.train_plan`; read by export, load, evaluate and ``run``, which need to know
what a run holds without importing the training code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
#: how a run's adapters start (qradaptor.adapter_init; "zero" is PEFT's own)
ADAPTER_INITS = ("activation", "balanced", "svd", "zero")
#: the starts fitted on the inputs calibration tokens give each linear (``--start-tokens`` of them)
CALIBRATED_INITS = ("activation", "balanced")
#: calibration tokens the activation start fits on by default (the sensitivity profile's default count; runs and
#: searches from before it was a setting used it)
DEFAULT_START_TOKENS = 4096
#: what a record written before a setting existed meant by it, where that differs from today's default
_BEFORE_SETTINGS = {"adapter_init": "zero"}


def setting(default, help: str, kind: str, choices: tuple[str, ...] | None = None):
    """A `RunConfig` field that is also a command-line setting of `train` and `run`: its help text and the kind of
    value it takes (``positive_int``, ``count`` (0 or more), ``int``, ``positive_float``, ``text``, ``dtype``,
    ``bool``), and for ``text`` the values it may take. The CLI makes its flags from these, so both commands say
    the same words (as PEFT's configs carry their own help)."""
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices})


@dataclass
class RunConfig:
    """Every setting of a training run, resolved (written to run.json; a resume must match it)."""

    model: str = "smollm2-135m"
    data: str = "pydoc-topics"
    # optimizer steps; resolved from ``epochs`` when that is given
    steps: int | None = setting(None, "optimizer steps", "positive_int")
    epochs: float | None = setting(None, "passes over the training split (default 1)", "positive_float")
    batch_size: int = setting(4, "blocks per micro-batch", "positive_int")
    grad_accum: int = setting(1, "micro-batches per optimizer step", "positive_int")
    seq_len: int = setting(256, "tokens per block", "positive_int")
    lr: float = setting(3e-4, "peak learning rate", "positive_float")
    warmup_steps: int = setting(5, "linear warm-up steps", "count")
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = setting(0, "seed of adapter init and data order", "int")
    backend: str = setting("hqq", "quantizer backend: hqq, hqq-native or reference", "text")
    # "auto": bf16 where the device computes it fast (1.9x faster per step than fp32 on a CPU with AVX512-BF16, loss
    # within the fp32 seeds' spread, benchmarks/results/dtype.md; half the activation memory), fp32 elsewhere
    # (precision.default_dtype). run.json records the resolved dtype.
    dtype: str = setting("auto", "compute, base and metadata dtype: auto (bfloat16 where this machine computes it "
                         "fast: a GPU with bf16, a CPU with AVX512-BF16 or AMX; float32 elsewhere), float32 or "
                         "bfloat16", "dtype")
    eval_every: int | None = setting(None, "validation every N steps (default: 5 times a run; 0: never)", "count")
    eval_blocks: int = setting(16, "validation blocks, 0 for none", "count")
    checkpoint_every: int | None = setting(None, "checkpoint every N steps (default: 10 per run)", "positive_int")
    max_train_blocks: int | None = setting(None, "use at most this many training blocks", "positive_int")
    # activation: adapters fitted to the quantization error as the calibration inputs see it (qradaptor.adapter_init;
    # at 4 bits on SmolLM2 the test loss after 100 steps drops by more than the whole gap to bf16 LoRA,
    # benchmarks/results/adapter_init.md); balanced: the same fit factored with A at PEFT's initial scale (no better
    # at lr 3e-3, results/ablation-lr0.003.md); zero: PEFT's own B = 0; svd: the fit in weight space
    adapter_init: str = setting("activation", "how adapters start: activation (fitted to each layer's quantization "
                                "error as calibration inputs see it), balanced (the same fit with A at PEFT's "
                                "initial scale), svd (fitted in weight space) or zero (PEFT's B = 0)", "text",
                                choices=ADAPTER_INITS)
    # fewer make the activation start cheaper (one forward over them, in the training dtype) and its fit rougher
    start_tokens: int = setting(DEFAULT_START_TOKENS, "calibration tokens of the training split the activation start "
                                "fits on (whole blocks; all the split has if fewer)", "positive_int")
    gradient_checkpointing: bool = setting(True, "recompute each decoder layer's activations in backward instead of "
                                           "keeping them (see the README's training memory)", "bool")
    device: str = "auto"  # auto: a CUDA GPU when PyTorch sees one, else the CPU (qradaptor.device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunConfig":
        """A run.json's settings over the defaults (a setting added after the run was written takes its default).
        Raises TypeError on a key this version does not know."""
        return cls(**{**cls().to_dict(), **_BEFORE_SETTINGS, **saved})


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
