"""``qradaptor evaluate``: held-out loss and perplexity (and lm-eval tasks) of a model, a plan's quantization of
it, a training run or an export."""

from __future__ import annotations

import os

from ..device import resolve_device
from ..evaluate import evaluate_lm_eval, evaluate_loss, lm_eval_task_manager


def evaluate_model(model: str | None = None, *, data: str | None = None, split: str = "validation",
                   plan=None, backend: str = "hqq", seq_len: int = 256, max_blocks: int | None = None,
                   batch_size: int = 8, lm_eval_tasks: list[str] | None = None, include_path: str | None = None,
                   progress: bool = True, device: str | None = None) -> dict:
    """What ``qradaptor evaluate`` prints: held-out loss and perplexity of ``model`` (quantized per
    ``plan`` when one is given, adapters untrained) on ``split`` of ``data``; with ``lm_eval_tasks``, also
    those lm-eval harness tasks (see `evaluate_lm_eval`) under the key ``lm_eval``.

    ``model`` may also be a training run directory or an exported directory (quantized base + trained
    adapter, loaded with `qradaptor.export.open_artifact`); then ``plan`` must be None (the artifact has one).
    ``device`` (``auto``, ``cpu``, ``cuda``): where the model is quantized and evaluated.
    """
    from ..data import load_blocks
    from ..errors import ArtifactError
    from ..export import artifact_kind, open_artifact
    from ..models import load_model
    from ..plan import Plan
    from ..quantize import quantize_model

    device = resolve_device(device)
    manager = None
    if lm_eval_tasks is not None or include_path is not None:  # bad tasks or paths fail before the model loads
        manager = lm_eval_task_manager(lm_eval_tasks or [], include_path)
    kind = artifact_kind(model) if model is not None and os.path.isdir(model) else None
    if kind is not None:
        if plan is not None:
            raise ArtifactError(f"{model} is a trained {'export' if kind == 'export' else 'run'} that has its own plan, "
                                "so --plan does not apply", "drop --plan")
        base, tokenizer, plan = open_artifact(model, device=device)
    else:
        base, tokenizer = load_model(model)
    blocks = load_blocks(data, tokenizer, split, seq_len=seq_len, max_blocks=max_blocks, model=base)
    if plan is not None and kind is None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        base = quantize_model(base, plan, backend, inplace=True, device=device)
    else:
        base.to(device)
    result = evaluate_loss(base, blocks, batch_size=batch_size, progress=progress)
    report = {**result.to_dict(), "split": split, "blocks": len(blocks), "seq_len": seq_len,
              "plan": None if plan is None else plan.describe(), "artifact": kind}
    if manager is not None:
        report["lm_eval"] = evaluate_lm_eval(base, tokenizer, lm_eval_tasks, task_manager=manager,
                                             batch_size=batch_size)
    return report
