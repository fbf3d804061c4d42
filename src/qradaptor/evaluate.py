"""Held-out loss and perplexity with our own loop: one forward per batch of packed blocks, the mean
next-token loss over every position that has a label; and tasks of the lm-eval harness (optional extra
``lmeval``) run offline on the same in-memory model."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm.auto import tqdm

from .architecture import backbone
from .errors import LMEvalError
from .threads import rebalance


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


#: Logit values computed at once by `token_nll` (2**23 fp32 values = 32 MiB; 170 tokens of a 49k vocabulary).
LOSS_CHUNK_VALUES = 2**23
# Config keys of architectures whose logits are not just ``lm_head(hidden)`` (they take the plain path).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _chunk_nll(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, ignore_index=-100, reduction="sum")


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, *,
              chunk_values: int = LOSS_CHUNK_VALUES) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count.

    The LM head and the loss run over chunks of labelled tokens (at most ``chunk_values`` logits each), and
    under autograd each chunk is checkpointed: the full ``tokens × vocabulary`` fp32 logits and their
    gradient never exist at once (for 4×256 tokens and SmolLM2's 49k vocabulary they would take 2×192 MiB).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = base.get_input_embeddings().weight.device  # the stages compute where the model is
    input_ids, labels = input_ids.to(device), labels.to(device)
    head = base.get_output_embeddings()
    target = labels[:, 1:]
    if head is None or any(getattr(base.config, k, None) for k in _LOGIT_TRANSFORMS):
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                              reduction="sum")
        return nll, int((target != -100).sum())
    hidden = backbone(base)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    keep = target != -100
    hidden, target = hidden[keep], target[keep]  # only labelled positions reach the head
    count = int(target.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0
    step = max(1, chunk_values // head.weight.shape[0])
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad
    total = None
    for start in range(0, count, step):
        args = (head, hidden[start : start + step], target[start : start + step])
        part = (torch.utils.checkpoint.checkpoint(_chunk_nll, *args, use_reentrant=False) if checkpointed
                else _chunk_nll(*args))
        total = part if total is None else total + part
    return total, count


@torch.no_grad()
def evaluate_loss(model, blocks, *, batch_size: int = 8, progress: bool = True, desc: str = "evaluate") -> EvalResult:
    """Mean held-out loss over ``blocks`` (a ``qradaptor.data.TokenBlocks``)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        rebalance()
        nll, n = token_nll(model, blocks.input_ids[start : start + batch_size], blocks.labels[start : start + batch_size])
        total += float(nll)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count)


# ---------------------------------------------------------------------------------------------- lm-eval
_LMEVAL_FIX = "pip install 'qradaptor[lmeval]' (or python3 scripts/bootstrap.py --test, which includes it)"
_LOCAL_TASK_FIX = ("write a YAML task that reads local files (dataset_path: json, dataset_kwargs: {data_files: "
                   "{test: /abs/path/test.jsonl}}) and pass its directory with --include-path")


def lm_eval_task_manager(tasks: list[str], include_path: str | os.PathLike | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks`` (task, group or tag names, or YAML
    files), after checking that lm-eval is installed and ``include_path`` is a directory. It indexes only
    ``include_path`` when that holds every name (milliseconds), else lm-eval's ~14k built-in YAML files too."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LMEvalError("lm-eval tasks need the lm-eval package, which is not installed", _LMEVAL_FIX) from None
    if not tasks:
        raise LMEvalError("no lm-eval task was named" + (f" to run from {include_path}" if include_path else ""),
                          "name them with --lm-eval TASK[,TASK...]")
    if include_path is not None and not Path(include_path).is_dir():
        raise LMEvalError(f"lm-eval include path {include_path} is not a directory"
                          + ("" if Path(include_path).exists() else " (it does not exist)"),
                          "pass the directory that holds your task YAML files to --include-path")

    def missing(manager):
        return [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]

    local = None if include_path is None else TaskManager(include_path=str(include_path), include_defaults=False)
    if local is not None and not missing(local):
        return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = missing(manager)
    if unknown:
        where = ("no --include-path was given" if local is None else
                 f"the YAML files under {include_path} define {', '.join(sorted(local.all_tasks)) or 'no task'}")
        raise LMEvalError(f"unknown lm-eval task {', '.join(map(repr, unknown))}: not built into lm-eval, and {where}",
                          "pass --include-path DIR, where DIR holds a YAML file whose `task:` is that name (a YAML "
                          "file that does not parse is skipped), or name a built-in task (`lm-eval ls tasks`)")
    return manager


@contextlib.contextmanager
def _lm_eval_context():
    """Where lm-eval runs: offline (the environment for what imports later, and the settings ``datasets`` and
    ``huggingface_hub`` already read from it at import), datasets cached in a temporary directory (never the
    home cache), its log quieted, its prints sent to stderr (stdout is for our report: --json), and no `git`
    call for the current directory's commit (a record we do not keep; it prints "fatal: ..." outside a repo)."""
    import datasets.config
    import huggingface_hub.constants

    with contextlib.ExitStack() as stack:
        cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qradaptor-lmeval-")))
        stack.enter_context(mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                         "HF_DATASETS_CACHE": str(cache)}))
        for module, name, value in [
                (huggingface_hub.constants, "HF_HUB_OFFLINE", True), (datasets.config, "HF_HUB_OFFLINE", True),
                (datasets.config, "HF_DATASETS_OFFLINE", True), (datasets.config, "HF_DATASETS_CACHE", cache),
                (datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads"),
                (datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")]:
            stack.enter_context(mock.patch.object(module, name, value))
        log = logging.getLogger("lm_eval")
        stack.callback(log.setLevel, log.level)
        log.setLevel(logging.ERROR)  # its INFO lines, and a warning about being given a model object
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        stack.enter_context(mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None))
        yield


def _load_task(manager, name: str) -> list:
    """The Task/Group objects lm-eval builds for ``name`` (its dataset loaded), or an error naming it."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        loaded = manager.load([name])
    except (ConnectionError, OfflineModeIsEnabled) as e:
        raise LMEvalError(f"lm-eval task {name!r} needs a dataset from the Hugging Face Hub, and evaluation runs "
                          f"offline ({e})", _LOCAL_TASK_FIX) from None
    except FileNotFoundError as e:
        raise LMEvalError(f"lm-eval task {name!r}: its data is missing ({e})", "correct data_files in the task's "
                          "YAML file (relative paths are read from the current directory)") from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def evaluate_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | os.PathLike | None = None,
                     task_manager=None, batch_size: int = 8, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval harness ``tasks`` on the in-memory ``model`` (plain, quantized or a PeftModel) with its
    ``tokenizer``: ``{task: {metric: value}}``, for groups too (a metric under a filter other than "none" is
    named ``metric,filter``; no standard errors). Offline: datasets come from local files (a task YAML with
    ``dataset_path: json`` and ``data_files``) through a temporary cache, removed afterwards. ``include_path``
    is a directory of task YAML files; ``task_manager`` (from `lm_eval_task_manager`) replaces it. ``limit``:
    at most this many documents per task (lm-eval's own option, for a quick look)."""
    manager = task_manager or lm_eval_task_manager(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with _lm_eval_context():
            built = [obj for name in tasks for obj in _load_task(manager, name)]
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            out = lm_eval.simple_evaluate(model=lm, tasks=built, task_manager=manager, limit=limit, bootstrap_iters=0,
                                          log_samples=False)
    finally:
        model.train(was_training)  # HFLM puts it in eval mode
    return {task: _metrics(values) for task, values in out["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` as ``{"acc": 0.5}``."""
    metrics = {}
    for key, value in values.items():
        metric, comma, filt = key.partition(",")
        if comma and isinstance(value, (int, float)):
            metrics[metric if filt == "none" else key] = float(value)
    return metrics
