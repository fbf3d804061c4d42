"""The command layer: what each ``qradaptor COMMAND`` does, one module per command.

A command resolves the model and data specs, loads each once, owns its output directory (layout, records,
resumption, refusing what it did not write) and calls the stages with in-memory objects. The stage modules
(``profile``, ``search``, ``train``, ``evaluate``, ``export``) take models, plans and token blocks and never
import this package; ``cli.py`` calls only this package.

    memory    `plan_memory`      predicted (or measured) bytes and training peak of a plan, against a budget
    evaluate  `evaluate_model`   held-out loss (and lm-eval tasks) of a model, a plan, a run or an export
    profile   `profile`          per-layer KL sensitivity → OUT/sensitivity.{json,png}
    search    `search`           the budgeted search → OUT/{plan,pareto}.json, pareto.png, study.db
    worker    `worker`           evaluate trials of a search's study from another process or machine
    train     `train_plan`       the full fine-tune of a plan in a resumable run directory
    export    `export`           a finished run → a directory stock transformers + peft load
    generate  `generate`         continue a prompt with an export or a finished run
    run       `run`              all stages in one run directory, each redone only when its inputs changed
    demo      `run_demo`         `run` on the embedded default against the best uniform setting
"""

from ..memory import format_bytes
from ..profile import RESULT_FILE
from ..search import summary
from .demo import run_demo
from .evaluate import evaluate_model
from .export import export
from .generate import generate
from .memory import plan_memory
from .profile import profile
from .run import run
from .search import prefix_fidelities, search, worker
from .train import RunResult, train_plan

__all__ = ["RESULT_FILE", "RunResult", "evaluate_model", "export", "format_bytes", "generate", "plan_memory",
           "prefix_fidelities", "profile", "run", "run_demo", "search", "summary", "train_plan", "worker"]
