"""``qradaptor run``: profile → search → train → evaluate → export, each stage in its own sub-directory of
the run directory and skipped when its output is already there and valid, so rerunning the same command
after a crash continues where it stopped.

    DIR/profile/sensitivity.json   stage 1
    DIR/search/plan.json           stages 2-3 (+ pareto.json, pareto.png, study.db)
    DIR/train/                     the full fine-tune (resumed from its last checkpoint if interrupted)
    DIR/metrics.json               held-out (test split) loss and perplexity, before and after training
    DIR/model/                     the export (stock transformers + peft, or qradaptor.load)
"""

from __future__ import annotations

import logging
from pathlib import Path

from .io import atomic_write_json

log = logging.getLogger("qradaptor")


def _profile_ok(path: Path, fingerprint: str) -> bool:
    from .profile import ProfileError, Sensitivity

    try:
        return Sensitivity.load(path).model_fingerprint == fingerprint
    except ProfileError:
        return False


def run(model: str | None = None, *, data: str | None = None, budget: str | int, out: str | Path,
        alpha: float = 0.5, trials: int = 24, steps: int = 200, profile_tokens: int = 4096,
        profile_dtype: str = "bfloat16", seq_len: int = 256, eval_blocks: int | None = None,
        search_settings: dict | None = None, train_settings: dict | None = None, progress: bool = True) -> dict:
    """What ``qradaptor run`` does. Returns the metrics written to ``out/metrics.json``."""
    from .evaluate import evaluate_model
    from .export import export
    from .memory import parse_training_budget
    from .models import load_model, model_fingerprint
    from .profile import ProfileSettings, profile_model
    from .search import search
    from .train import read_run, train_plan

    out = Path(out)
    base, tokenizer = load_model(model)
    fingerprint = model_fingerprint(base)

    sensitivity = out / "profile" / "sensitivity.json"
    if _profile_ok(sensitivity, fingerprint):
        log.info("run: profile done, using %s", sensitivity)
    else:
        log.info("run: stage 1/5, sensitivity profile")
        profile_model(base, tokenizer, ProfileSettings(tokens=profile_tokens, seq_len=seq_len, dtype=profile_dtype,
                                                       data=data),
                      out=out / "profile", force=True, progress=progress)
    del base

    plan = out / "search" / "plan.json"
    if plan.is_file() and (out / "search" / "pareto.json").is_file():
        log.info("run: search done, using %s", plan)
    else:
        log.info("run: stage 2-3/5, budgeted search")
        search(model, data=data, budget=budget, out=out / "search", alpha=alpha, trials=trials,
               sensitivity=str(sensitivity), progress=progress, seq_len=seq_len, **(search_settings or {}))

    train_dir = out / "train"
    status = (read_run(train_dir) or {}).get("status")
    if status == "finished":
        log.info("run: training done, using %s", train_dir)
    else:
        log.info("run: stage 4/5, fine-tune of the chosen plan%s", " (resuming)" if status else "")
        # a budget on the training peak also binds the fine-tune (refused before it starts if it cannot fit)
        train_budget = budget if parse_training_budget(budget) is not None else None
        train_plan(train_dir, plan=plan, model=model, data=data, steps=None if status else steps,
                   seq_len=None if status else seq_len, resume=bool(status), progress=progress, budget=train_budget,
                   **({} if status else (train_settings or {})))

    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        import json

        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    else:
        log.info("run: evaluating on the test split")
        after = evaluate_model(str(train_dir), data=data, split="test", seq_len=seq_len, max_blocks=eval_blocks,
                               progress=progress)
        before = evaluate_model(model, data=data, split="test", plan=str(plan), seq_len=seq_len,
                                max_blocks=eval_blocks, progress=progress)
        metrics = {"test_loss_before": before["loss"], "test_loss_after": after["loss"],
                   "test_perplexity_after": after["perplexity"], "test_tokens": after["tokens"]}
        atomic_write_json(metrics_path, metrics)

    model_dir = out / "model"
    if (model_dir / "qradaptor" / "export.json").is_file():
        log.info("run: export done, %s", model_dir)
        exported = None
    else:
        log.info("run: stage 5/5, export")
        exported = export(train_dir, model_dir)
    return {**metrics, "plan": str(plan), "model": str(model_dir),
            "memory": None if exported is None else exported["memory"]}
