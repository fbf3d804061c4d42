"""``qradaptor memory``: a plan's predicted bytes and training peak on a model, from its config alone (or measured),
and whether it fits a budget."""

from __future__ import annotations

import torch

from ..errors import ArtifactError, BudgetError
from ..gguf_export import predict_gguf
from ..memory import (ModelShapes, check_budget, fitting_batch, measured_bytes, meta_model, parse_budget,
                      parse_gguf_budget, parse_training_budget, predict, training_memory)
from ..plan import Plan
from ..precision import DTYPES, resolve_dtype


def plan_memory(model: str | None, plan: "Plan | str", *, backend: str = "hqq", dtype: str | torch.dtype = "auto",
                measure: bool = False, budget: str | int | None = None, batch_size: int = 4, seq_len: int = 256,
                checkpointing: bool = True) -> dict:
    """What ``qradaptor memory`` prints: the plan's predicted bytes from the model's config alone, and the
    predicted peak memory of training it on batches of ``batch_size × seq_len`` tokens (key ``training``);
    with ``measure``, the bytes the built model (quantized base + adapters) really holds; with ``budget``
    (on the stored model, ``train:SIZE`` on the training peak, or ``gguf:SIZE`` on the GGUF files), the budget in
    bytes and whether it fits. ``gguf``: the sizes of the files ``export --gguf`` would write (`predict_gguf`), or
    None with ``gguf_unavailable`` saying why not.
    ``dtype``: of the base, scales and zeros (``auto``: the dtype `train` and `search` compute in on this machine,
    `precision.default_dtype`), so a plan is priced here as they price it."""
    from ..architecture import split_experts
    from ..backends import get_backend
    from ..models import load_config, load_model

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    for key, value in (("batch size", batch_size), ("sequence length", seq_len)):
        if value < 1:
            raise BudgetError(f"the {key} must be at least 1, got {value}", f"pass a positive {key}")
    dtype_name = resolve_dtype(dtype)
    dtype = DTYPES[dtype_name]
    quant = get_backend(backend, compute_dtype=dtype)
    config = load_config(model)
    meta = meta_model(config)
    split_experts(meta)  # as training splits them (the shapes are the same either way)
    plan.check_model(meta)  # its modules' names too: `predict` would price one the model lacks at its layer's
    shapes = ModelShapes.from_model(meta)
    report = predict(shapes, plan, quant)
    training = training_memory(shapes, plan, quant, config, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                               checkpointing=checkpointing)
    out = {**report.to_dict(), "plan": plan.describe(), "backend": quant.name, "dtype": dtype_name,
           "training": training.to_dict(), "expert_weights": shapes.expert_numel,
           "expert_adapters": plan.expert_adapters,
           "unquantized_weights": shapes.unquantized_numel, "decoder_weights": shapes.quantizable_numel
           + shapes.unquantized_numel}
    try:  # what `export --gguf` would write for it, where it can be written
        out["gguf"] = predict_gguf(meta, plan, quant, spec=model, dtype=dtype).to_dict() if not plan.dora else None
        out["gguf_unavailable"] = "llama.cpp has no DoRA adapters" if plan.dora else None
    except ArtifactError as e:
        out["gguf"], out["gguf_unavailable"] = None, e.cause
    if budget is not None:
        train_budget, gguf_budget = parse_training_budget(budget), parse_gguf_budget(budget)
        if gguf_budget is not None:
            if out["gguf"] is None:
                raise BudgetError(f"a gguf: budget is on the files `export --gguf` writes, and for this plan on this "
                                  f"model they cannot be written: {out['gguf_unavailable']}",
                                  "give a budget on the stored model (4bit, 350MB)")
            out.update(budget_bytes=gguf_budget, budget_on="GGUF files",
                       fits=out["gguf"]["total_bytes"] <= gguf_budget)
        elif train_budget is not None:
            out.update(budget_bytes=train_budget, budget_on="training peak", fits=training.peak_bytes <= train_budget)
            fit = fitting_batch(shapes, plan, quant, config, budget_bytes=train_budget, batch_size=batch_size,
                                seq_len=seq_len, dtype=dtype, checkpointing=checkpointing)
            out["fitting_batch"] = None if fit is None else {"batch_size": fit[0], "checkpointing": fit[1]}
        else:
            budget_bytes = parse_budget(budget, shapes, quant, group_size=plan.group_size,
                                        target_modules=plan.target_modules, dora=plan.dora,
                                        expert_adapters=plan.expert_adapters)
            check_budget(budget_bytes, shapes, quant, group_size=plan.group_size, target_modules=plan.target_modules)
            out.update(budget_bytes=budget_bytes, budget_on="stored model", fits=report.total_bytes <= budget_bytes)
    if measure:
        from ..quantize import prepare_model

        base, _ = load_model(model)
        out["measured_bytes"] = measured_bytes(prepare_model(base, plan, quant))
    return out
