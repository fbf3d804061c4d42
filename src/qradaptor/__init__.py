"""qradaptor: per-layer bit-widths and LoRA ranks chosen under a memory budget (QR-Adaptor).

The library mirrors the CLI: each ``qradaptor COMMAND`` is a function here (from ``qradaptor.commands``); the
stages below them take models, plans and token blocks.
"""

import os as _os

# Training on the CPU, glibc's heap keeps the freed activations of each step for reuse, so a process peaks far
# above what its tensors need. PyTorch's huge-page allocation path (page-aligned blocks, advised as transparent
# huge pages from 2 MiB) avoids most of that at no step-time cost: uniform 4-bit training memory 0.4-0.5x of
# glibc's defaults (benchmarks/memory.py). PyTorch reads the setting at its first allocation, so it is set
# before the stages import torch; a user's own value wins (THP_MEM_ALLOC_ENABLE=0 turns it off).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .backends import get_backend
from .commands import (evaluate_model, export, generate, plan_memory, profile, run, run_demo, search, train_plan,
                       worker)
from .data import load_blocks
from .errors import QRAdaptorError
from .evaluate import evaluate_lm_eval, evaluate_loss
from .export import TrainedModel, load, load_artifact, open_run
from .memory import ModelShapes, measured_bytes, parse_budget, predict, training_memory
from .models import LoadedModel, load_base, load_model, model_fingerprint
from .plan import LayerChoice, Plan, lora_config
from .profile import Sensitivity
from .quantize import add_adapters, dequantized_model, prepare_model, quantize_model
from .rundir import RunConfig
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "LayerChoice", "ModelShapes", "Plan", "QRAdaptorError", "TrainConfig", "add_adapters", "evaluate_loss",
    "evaluate_model", "get_backend", "load_blocks", "load_model", "lora_config", "measured_bytes", "model_fingerprint",
    "parse_budget", "plan_memory", "predict", "prepare_model", "profile", "Sensitivity", "quantize_model", "run_demo", "train",
    "RunConfig", "export", "run", "search", "generate", "load", "load_artifact", "train_plan",
    "evaluate_lm_eval", "training_memory", "LoadedModel", "load_base", "TrainedModel", "open_run",
    "dequantized_model", "worker",
]
