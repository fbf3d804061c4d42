"""``qradaptor search`` and ``qradaptor worker``: resolve the model, data and budget, then run the search
(``qradaptor.search``: Optuna storage, NSGA-II, promotion, refinement) and write its outputs into ``out``."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from ..architecture import DEFAULT_TARGET_MODULES
from ..backends import backend_for
from ..device import resolve_device
from ..memory import ModelShapes, parse_budget, parse_gguf_budget, parse_training_budget
from ..models import LoadedModel, load_base
from ..plan import Plan
from ..precision import DTYPE_CHOICES, DTYPES, resolve_dtype
from ..profile import Sensitivity
from ..search import (CONFIG_ATTR, FORMAT, RUNS_DIR, FineTuneFitness, Fitness, Search, SearchConfig, SearchError, SearchResult,
                      check_search_dir, check_searchable, locked_search_dir, open_storage, recorded_config, redact,
                      search_data_fingerprint, search_rate, training_fixed_bytes, write_outputs)

log = logging.getLogger("qradaptor")


def _load_or_profile(sensitivity: str | None, out: Path, model, tokenizer, data, progress: bool,
                     config: SearchConfig, device) -> Sensitivity:
    from ..profile import RESULT_FILE, ProfileSettings, profile_model

    path = Path(sensitivity) if sensitivity else out / RESULT_FILE
    if path.is_file():
        from ..architecture import decoder_layers

        prior = Sensitivity.load(path)
        prior.check_layers(len(decoder_layers(model)), source=str(path))
        if config.genes != "layer" and not prior.module_kl:
            log.warning("search: %s has no per-linear estimates: --genes %s prices each unit by its share of its "
                        "layer's weights (profile with --modules for a better prior)", path, config.genes)
        return prior
    if sensitivity:
        raise SearchError(f"sensitivity file not found: {path}", "run `qradaptor profile` first or omit --sensitivity")
    log.info("search: no sensitivity profile in %s, profiling first", out)
    # the search's own blocks, backend and groups: data too short for 256-token blocks works with --seq-len
    settings = ProfileSettings(data=data, seq_len=config.seq_len, backend=config.backend, group_size=config.group_size,
                               modules=config.genes != "layer")
    return profile_model(model, tokenizer, settings, out=out, progress=progress, device=device)


def prefix_fidelities(settings: dict, *, steps: int, batch_size: int, lr: float) -> dict:
    """``settings`` with fidelities that measure each plan on the first steps of a ``steps``-step fine-tune
    (batches of ``batch_size``, peak ``lr``: the final fine-tune's schedule), so that a promoted plan continues its
    cheap run and the final fine-tune continues the chosen plan's. What a fidelity's own dict gives wins; one
    longer than ``steps`` stays a fine-tune of its own (at peak ``lr`` too)."""
    out = rated_fidelities(settings, lr)
    for key in ("cheap", "full"):
        given, fidelity = settings.get(key) or {}, out[key]
        if "schedule_steps" not in given and fidelity["steps"] <= steps:
            fidelity.update(schedule_steps=steps, batch_size=given.get("batch_size", batch_size))
    return out


def rated_fidelities(settings: dict, lr: float) -> dict:
    """``settings`` with both fidelities' fine-tunes at peak ``lr`` (what a fidelity's own dict gives wins)."""
    out = dict(settings)
    for key in ("cheap", "full"):
        given = dict(settings.get(key) or {})
        out[key] = {**asdict(SearchConfig.__dataclass_fields__[key].default_factory()), **given,
                    "lr": given.get("lr", lr)}
    return out


def search(model: str | LoadedModel | None = None, *, data: str | None = None, budget: str | int, out: str | Path,
           alpha: float = 0.5, trials: int = 8, storage: str | None = None, study: str | None = None,
           sensitivity: str | None = None, progress: bool = True, fitness: Fitness | None = None,
           device: str | None = None, dtype: str = "auto", final_steps: int | None = None,
           search_lr: float | None = None, **settings) -> SearchResult:
    """What ``qradaptor search`` does; returns the result and writes ``out/{pareto.json,plan.json,pareto.png}``.
    ``model``: a spec, or a `LoadedModel` (converted to ``dtype`` in place if it is not; left unquantized, and
    where it was). ``device`` (``auto``, ``cpu``, ``cuda``): where each plan is quantized and fine-tuned.
    ``dtype``: what the plans' fine-tunes compute in and are priced in (``float32``, ``bfloat16``, or ``auto``: the
    one `train` computes in on this device, `precision.default_dtype`; a study begun before keeps the dtype it
    recorded); a kept run (fidelities with ``schedule_steps``, see `prefix_fidelities`) continues only into a
    fine-tune of the same dtype.
    ``final_steps``: measure plans on the first steps of a ``final_steps``-step `train` at its default batch size
    and learning rate (`prefix_fidelities`), keeping the runs that ``train --init-from`` continues.
    ``search_lr``: the peak learning rate of the plans' fine-tunes (default: with ``final_steps``, `train`'s; else
    the fidelities' own); a kept run is the beginning of a fine-tune at that rate."""
    if final_steps:
        from ..rundir import RunConfig

        settings = prefix_fidelities(settings, steps=final_steps, batch_size=RunConfig.batch_size,
                                     lr=search_rate(RunConfig.lr, search_lr))
        if not settings["full"].get("schedule_steps"):
            log.warning("search: the full fidelity's %d steps are more than the final fine-tune's %d: plans chosen "
                        "there are fine-tunes of their own, not the beginning of the final one",
                        settings["full"]["steps"], final_steps)
    elif search_lr is not None:  # fine-tunes of their own schedule, at this rate
        settings = rated_fidelities(settings, search_rate(search_lr, given=search_lr))

    out = Path(out)
    device = resolve_device(device)
    if dtype not in DTYPE_CHOICES:
        raise SearchError(f"unknown dtype {dtype!r}", f"use {', '.join(DTYPE_CHOICES)}")
    check_search_dir(out)
    storage_url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study = study or "qradaptor"
    reached = open_storage(storage_url) if storage else None  # reach the server before anything is written locally
    recorded = recorded_config(reached or storage_url, study)  # None: a new study
    if dtype == "auto":  # a study begun before goes on in the dtype it recorded; a new one in this device's
        # (float32 where it began before the dtype was recorded)
        dtype = (recorded.get("dtype") or "float32") if recorded is not None else resolve_dtype(dtype, device)
    if settings.get("rank_value") is None:  # and with the prior's price of rank it recorded (its default has changed)
        settings.pop("rank_value", None)
        if recorded is not None and recorded.get("rank_value") is not None:
            settings["rank_value"] = recorded["rank_value"]
    if settings.get("recovered_bits") is None:  # ... and the KL its prior charged (all of it before it was recorded)
        settings.pop("recovered_bits", None)
        if recorded is not None:
            settings["recovered_bits"] = recorded.get("recovered_bits") or 8
    loaded = load_base(model, dtype=DTYPES[dtype])
    base, tokenizer, model = loaded.model, loaded.tokenizer, loaded.spec
    settings = Plan.check_settings(base, settings)  # refused before any work, naming the model's linears
    shapes = ModelShapes.from_model(base)
    backend = backend_for(base, settings.get("backend", "hqq"))  # priced in the dtype the plans train in
    train_budget, gguf_budget = parse_training_budget(budget), parse_gguf_budget(budget)
    if gguf_budget is not None:
        from ..gguf_export import distinct_bits, exposes_codes, gguf_budget_size

        if not settings.get("bits"):  # the default ladder, less the widths that cost what a higher one does
            settings["bits"] = distinct_bits(SearchConfig.bits, shapes, group_size=settings.get("group_size", 64),
                                             has_codes=exposes_codes(backend.module_class))
        config = SearchConfig(budget_bytes=gguf_budget, alpha=alpha, trials=trials, budget_on="gguf", **settings)
        template = Plan.uniform(shapes.num_layers, 4, config.ranks[0], **config.plan_settings())
        config.gguf_fixed_bytes = gguf_budget_size(base, template, backend, spec=model,
                                                   dtype=DTYPES[dtype]).fixed_bytes
    elif train_budget is None:
        budget_bytes = parse_budget(budget, shapes, backend, group_size=settings.get("group_size", 64),
                                    target_modules=tuple(settings.get("target_modules") or DEFAULT_TARGET_MODULES),
                                    dora=bool(settings.get("dora")),
                                    expert_adapters=bool(settings.get("expert_adapters")))
        config = SearchConfig(budget_bytes=budget_bytes, alpha=alpha, trials=trials, **settings)
    else:
        config = SearchConfig(budget_bytes=train_budget, alpha=alpha, trials=trials, budget_on="training", **settings)
        config.training_fixed_bytes = training_fixed_bytes(shapes, backend, base.config, config)
    check_searchable(config, shapes, backend)
    data_fp = search_data_fingerprint(data, config)
    with locked_search_dir(out, storage_url, study):
        prior = _load_or_profile(sensitivity, out, base, tokenizer, data, progress, config, device)
        fitness = fitness or FineTuneFitness(base, tokenizer, data=data, config=config, device=device,
                                             runs=out / RUNS_DIR)
        runner = Search(model=base, sensitivity=prior, config=config, storage=storage_url, study_name=study,
                        fitness=fitness, run_config={"model": model, "data": data, "data_fingerprint": data_fp},
                        progress=progress)
        result = runner.run()
        write_outputs(result, out, shapes, runner.backend)
    return result


def worker(*, storage: str, study: str, progress: bool = True, device: str | None = None) -> int:
    """What ``qradaptor worker`` does: join a study's exploration and evaluate its trials until it has enough.
    Everything else (model, data, budget, space, prior) comes from the study; ``device`` is this worker's."""
    import optuna

    device = resolve_device(device)
    store = open_storage(storage)
    try:
        summaries = {s.study_name: s for s in optuna.get_all_study_summaries(store)}
    except Exception as e:  # noqa: BLE001 - any storage failure is the user's to fix
        raise SearchError(f"cannot read studies from {redact(storage)}: {e}", "check the storage URL") from None
    if study not in summaries:
        raise SearchError(f"no study named {study!r} in {redact(storage)}",
                          f"start it with `qradaptor search --storage URL --study {study}` (studies: {sorted(summaries)})")
    config_dict = summaries[study].user_attrs.get(CONFIG_ATTR)
    if not config_dict or config_dict.get("format") != FORMAT:
        raise SearchError(f"study {study!r} was not created by qradaptor search", "pass a study made by `qradaptor search`")
    # in the dtype the search's fine-tunes compute in (studies from before it was recorded: float32)
    loaded = load_base(config_dict.get("model"), dtype=DTYPES[config_dict.get("dtype") or "float32"])
    base, tokenizer = loaded.model, loaded.tokenizer
    config = SearchConfig.from_dict({k: v for k, v in config_dict.items()
                                     if k in SearchConfig.__dataclass_fields__})
    prior = Sensitivity.from_dict(config_dict["sensitivity"], source=f"study {study}")
    data = config_dict.get("data")
    # the study refuses this worker (naming the data) if the data here differs from what the search scored on
    data_fp = search_data_fingerprint(data, config) if config_dict.get("data_fingerprint") else None
    fitness = FineTuneFitness(base, tokenizer, data=data, config=config, device=device)
    runner = Search(model=base, sensitivity=prior, config=config, storage=store, study_name=study, fitness=fitness,
                    run_config={"model": config_dict.get("model"), "data": data, "data_fingerprint": data_fp},
                    progress=progress, seed_offset=1 + int.from_bytes(os.urandom(4), "little"))
    runner.explore(warm_start=False)
    return len(runner.study.trials)
