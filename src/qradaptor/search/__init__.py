"""Stages 2–3: the budget-constrained search for a plan, on Optuna storage.

1. Warm start: uniform plans that fit, and plans filled greedily from the sensitivity prior at several
   fractions of the budget (sensitive layers get bits and ranks first).
2. Exploration: NSGA-II over bits and ranks per unit of choice (``genes``: each decoder layer by default, or
   each block of a layer, or each linear; with ``group_sizes``, its group size too). Every suggested plan is repaired into the budget
   (deterministically: lower the bit-width or rank that costs least prior sensitivity per byte saved),
   so an infeasible plan never gets a fine-tune; objectives are (held-out loss after a *cheap* fine-tune,
   memory). Identical repaired plans are evaluated once. The repair happens in the sampler (``sampler.py``),
   so a trial's parameters are the plan that was scored and NSGA-II breeds only from evaluated plans.
3. Promotion: the cheap front's best plans (by the preference ``alpha``) get the *expensive* fidelity.
   Fidelities with ``schedule_steps`` measure a plan on the first steps of the final fine-tune's schedule:
   each plan's run is kept (``OUT/runs``, only for the plans that would be promoted), a promoted plan continues
   its cheap run instead of starting over, and the chosen plan's run is where ``train --init-from`` continues.
   The fine-tunes rank plans at the final one's learning rate unless given another (`search_rate`).
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

The prior's units: per-layer KL for bits (a unit's own estimate where the profile made per-linear ones); halving
a layer's rank is charged ``rank_value`` times that layer's KL at 4 bits (`config.default_rank_value`, by how the
fine-tunes start their adapters: measured on SmolLM2 in benchmarks/results/rank_value.md), a unit its share of it;
bits are charged only their KL above their KL at ``recovered_bits`` (`config.default_recovered_bits`: 4 with a
quantization-aware start, which recovers what more bits would keep; 8, the whole KL, from zero). A study keeps the
prior it began with.
It only orders repair and warm-start moves; fitness is measured.

The package keeps one concern per module: ``config`` (settings), ``genes`` (plans as Optuna parameters), ``planner`` (prior cost, memory, repair),
``fitness`` (the fine-tune objective), ``storage`` (Optuna storage, locks, leases, stale trials), ``sampler``
(the exploration's repairing sampler), ``loop`` (the stages), ``report`` (results and output files). The
commands that resolve a model, data and budget and run a search (``qradaptor search``, ``qradaptor worker``) are
in ``qradaptor.commands.search``. Optuna is used through its public API only.
"""

from __future__ import annotations

from .config import (CONFIG_ATTR, DEFAULT_BITS, DEFAULT_RANKS, FORMAT, MARKER, SEARCH_FILES, Fidelity,
                     SearchConfig, SearchError, search_rate)
from .fitness import RUNS_DIR, FineTuneFitness, Fitness, run_name
from .genes import GENE_LAYOUTS, Genes, plan_key
from .loop import Search
from .planner import (Planner, PriorCost, check_searchable, group_error_ratios, plan_from_key,
                      training_fixed_bytes)
from .report import (Evaluated, SearchResult, bit_widths_tried, describe_bit_widths, kept_run, measured_uniform,
                     pareto_front, plot_pareto, summary, write_outputs)
from .storage import (check_search_dir, locked_search_dir, open_storage, recorded_config, redact,
                      search_data_fingerprint)

__all__ = ["CONFIG_ATTR", "DEFAULT_BITS", "DEFAULT_RANKS", "Evaluated", "FORMAT", "Fidelity", "GENE_LAYOUTS", "Genes",
           "FineTuneFitness", "Fitness", "MARKER", "Planner", "PriorCost",
           "group_error_ratios", "RUNS_DIR", "SEARCH_FILES", "Search", "SearchConfig",
           "SearchError", "SearchResult", "bit_widths_tried", "describe_bit_widths", "measured_uniform", "open_storage",
           "pareto_front", "plan_from_key", "plan_key", "plot_pareto",
           "recorded_config", "redact", "search_data_fingerprint", "search_rate", "summary", "training_fixed_bytes", "write_outputs",
           "check_search_dir", "check_searchable", "kept_run", "locked_search_dir", "run_name"]
