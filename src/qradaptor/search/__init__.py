"""Stages 2–3: the budget-constrained search for a plan, on Optuna storage.

1. Warm start: uniform plans that fit, and plans filled greedily from the sensitivity prior at several
   fractions of the budget (sensitive layers get bits and ranks first).
2. Exploration: NSGA-II over per-layer bits and ranks. Every suggested plan is repaired into the budget
   (deterministically: lower the bit-width or rank that costs least prior sensitivity per byte saved),
   so an infeasible plan never gets a fine-tune; objectives are (held-out loss after a *cheap* fine-tune,
   memory). Identical repaired plans are evaluated once. The repair happens in the sampler (``sampler.py``),
   so a trial's parameters are the plan that was scored and NSGA-II breeds only from evaluated plans.
3. Promotion: the cheap front's best plans (by the preference ``alpha``) get the *expensive* fidelity.
4. Refinement: a Gaussian process over plan encodings proposes, by expected improvement of the
   alpha-scalarised objective, among one-edit neighbours of the expensive front; a few iterations.

Trials live in Optuna storage: SQLite in the output directory by default (an interrupted search
resumes), or any RDB URL, through which ``qradaptor worker`` processes on other machines evaluate
exploration trials of the same study. The study's user attributes hold the whole search config (model
fingerprint, budget, space, fidelities, the prior), so a worker needs only the URL and the study name,
and a study cannot be reused for another model or space by accident (nor with other data contents: the
study records their fingerprint).

One search per --out and per study: the search holds a lock on ``OUT/.qradaptor-search`` (which also marks
the directory as the tool's; a non-empty directory without it is refused) and a heartbeat lease in the
study ``NAME:coordinator``, so a second ``search`` is refused, naming the first; ``qradaptor worker`` is
how more processes join. A trial left RUNNING is failed (and its plan retried) only when its process is
known dead: at once on this machine, after the heartbeat grace period elsewhere.

The prior's units: per-layer KL for bits; halving a layer's rank is charged ``rank_value`` times that
layer's KL at 4 bits (on SmolLM2, halving every rank cost about a third of what 4-bit quantization costs
in held-out loss; see DESIGN §6). It only orders repair and warm-start moves; fitness is measured.

The package keeps one concern per module: ``config`` (settings), ``planner`` (prior cost, memory, repair),
``fitness`` (the fine-tune objective), ``storage`` (Optuna storage, locks, leases, stale trials), ``sampler``
(the exploration's repairing sampler), ``loop`` (the stages), ``report`` (results and output files); this module
holds the two commands. Optuna is used through its public API only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..backends import get_backend
from ..errors import BudgetError
from ..memory import ModelShapes, parse_budget, parse_training_budget
from ..models import LoadedModel, load_base
from ..profile import Sensitivity
from .config import (CONFIG_ATTR, DEFAULT_BITS, DEFAULT_RANKS, FORMAT, MARKER, SEARCH_FILES, Fidelity, SearchConfig,
                     SearchError)
from .fitness import FineTuneFitness, Fitness
from .loop import Search
from .planner import Planner, PriorCost, _check_searchable, plan_from_key, plan_key, training_fixed_bytes
from .report import Evaluated, SearchResult, pareto_front, plot_pareto, summary, write_outputs
from .storage import _check_out, _locked_out, open_storage, redact, search_data_fingerprint

log = logging.getLogger("qradaptor")

__all__ = ["BudgetError", "CONFIG_ATTR", "DEFAULT_BITS", "DEFAULT_RANKS", "Evaluated", "FORMAT", "Fidelity",
           "FineTuneFitness", "Fitness", "MARKER", "Planner", "PriorCost", "SEARCH_FILES", "Search", "SearchConfig",
           "SearchError", "SearchResult", "open_storage", "pareto_front", "plan_from_key", "plan_key", "plot_pareto",
           "redact", "search", "search_data_fingerprint", "summary", "training_fixed_bytes", "worker",
           "write_outputs"]


def _load_or_profile(sensitivity: str | None, out: Path, model, tokenizer, data, progress: bool,
                     config: SearchConfig) -> Sensitivity:
    from ..profile import RESULT_FILE, ProfileSettings, profile_model

    path = Path(sensitivity) if sensitivity else out / RESULT_FILE
    if path.is_file():
        from ..architecture import decoder_layers

        prior = Sensitivity.load(path)
        prior.check_layers(len(decoder_layers(model)), source=str(path))
        return prior
    if sensitivity:
        raise SearchError(f"sensitivity file not found: {path}", "run `qradaptor profile` first or omit --sensitivity")
    log.info("search: no sensitivity profile in %s, profiling first", out)
    # the search's own blocks, backend and groups: data too short for 256-token blocks works with --seq-len
    settings = ProfileSettings(data=data, seq_len=config.seq_len, backend=config.backend, group_size=config.group_size)
    return profile_model(model, tokenizer, settings, out=out, progress=progress)


def search(model: str | LoadedModel | None = None, *, data: str | None = None, budget: str | int, out: str | Path,
           alpha: float = 0.5, trials: int = 24, storage: str | None = None, study: str | None = None,
           sensitivity: str | None = None, progress: bool = True, fitness: Fitness | None = None,
           **settings) -> SearchResult:
    """What ``qradaptor search`` does; returns the result and writes ``out/{pareto.json,plan.json,pareto.png}``.
    ``model``: a spec, or a `LoadedModel` (converted to float32 in place if it is not; left unquantized)."""
    out = Path(out)
    _check_out(out)
    loaded = load_base(model)
    base, tokenizer, model = loaded.model, loaded.tokenizer, loaded.spec
    shapes = ModelShapes.from_model(base)
    backend = get_backend(settings.get("backend", "hqq"))
    train_budget = parse_training_budget(budget)
    if train_budget is None:
        budget_bytes = parse_budget(budget, shapes, backend, group_size=settings.get("group_size", 64))
        config = SearchConfig(budget_bytes=budget_bytes, alpha=alpha, trials=trials, **settings)
    else:
        config = SearchConfig(budget_bytes=train_budget, alpha=alpha, trials=trials, budget_on="training", **settings)
        config.training_fixed_bytes = training_fixed_bytes(shapes, backend, base.config, config)
    _check_searchable(config, shapes, backend)
    data_fp = search_data_fingerprint(data, config)
    storage_url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if storage:  # reach the server before anything is written locally
        open_storage(storage_url)
    study = study or "qradaptor"
    with _locked_out(out, storage_url, study):
        prior = _load_or_profile(sensitivity, out, base, tokenizer, data, progress, config)
        fitness = fitness or FineTuneFitness(base, tokenizer, data=data, config=config)
        runner = Search(model=base, sensitivity=prior, config=config, storage=storage_url, study_name=study,
                        fitness=fitness, run_config={"model": model, "data": data, "data_fingerprint": data_fp},
                        progress=progress)
        result = runner.run()
        write_outputs(result, out, shapes, runner.backend)
    return result


def worker(*, storage: str, study: str, progress: bool = True) -> int:
    """What ``qradaptor worker`` does: join a study's exploration and evaluate its trials until it has enough.
    Everything else (model, data, budget, space, prior) comes from the study."""
    import optuna

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
    loaded = load_base(config_dict.get("model"))
    base, tokenizer = loaded.model, loaded.tokenizer
    config = SearchConfig.from_dict({k: v for k, v in config_dict.items()
                                     if k in SearchConfig.__dataclass_fields__})
    prior = Sensitivity.from_dict(config_dict["sensitivity"], source=f"study {study}")
    data = config_dict.get("data")
    # the study refuses this worker (naming the data) if the data here differs from what the search scored on
    data_fp = search_data_fingerprint(data, config) if config_dict.get("data_fingerprint") else None
    fitness = FineTuneFitness(base, tokenizer, data=data, config=config)
    runner = Search(model=base, sensitivity=prior, config=config, storage=store, study_name=study, fitness=fitness,
                    run_config={"model": config_dict.get("model"), "data": data, "data_fingerprint": data_fp},
                    progress=progress, seed_offset=1 + int.from_bytes(os.urandom(4), "little"))
    runner.explore(warm_start=False)
    return len(runner.study.trials)
