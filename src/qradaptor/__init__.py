"""qradaptor: per-layer bit-widths and LoRA ranks chosen under a memory budget (QR-Adaptor).

The library mirrors the CLI: each ``qradaptor COMMAND`` is a function here.
"""

import warnings

# peft asks transformers about gradient checkpointing through a deprecated alias on every adapter
# attach/load; the warning is theirs, not the user's, and would interleave with our one-line errors.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from .backends import get_backend  # noqa: E402
from .data import load_blocks  # noqa: E402
from .demo import run_demo  # noqa: E402
from .pipeline import run  # noqa: E402
from .errors import QRAdaptorError  # noqa: E402
from .evaluate import evaluate_lm_eval, evaluate_loss, evaluate_model  # noqa: E402
from .export import export, generate, load, load_artifact  # noqa: E402
from .memory import ModelShapes, measured_bytes, parse_budget, plan_memory, predict, training_memory  # noqa: E402
from .models import load_model, model_fingerprint  # noqa: E402
from .plan import LayerChoice, Plan, lora_config  # noqa: E402
from .profile import Sensitivity, profile  # noqa: E402
from .quantize import add_adapters, prepare_model, quantize_model  # noqa: E402
from .search import search  # noqa: E402
from .rundir import RunConfig  # noqa: E402
from .train import TrainConfig, train, train_plan  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LayerChoice", "ModelShapes", "Plan", "QRAdaptorError", "TrainConfig", "add_adapters", "evaluate_loss",
    "evaluate_model", "get_backend", "load_blocks", "load_model", "lora_config", "measured_bytes", "model_fingerprint",
    "parse_budget", "plan_memory", "predict", "prepare_model", "profile", "Sensitivity", "quantize_model", "run_demo", "train",
    "RunConfig", "export", "run", "search", "generate", "load", "load_artifact", "train_plan",
    "evaluate_lm_eval", "training_memory",
]
