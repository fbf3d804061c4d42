"""The exploration sampler: Optuna's NSGA-II (or random sampling), with every suggestion repaired into the
budget before it becomes the trial's parameters.

Why a sampler and not repair inside the objective: NSGA-II breeds its next generation from the parameters
stored on COMPLETE trials. Repairing inside the objective scored the repaired plan but left the unrepaired
suggestion as the trial's parameters, so NSGA-II bred from plans that were never evaluated. Reporting the
over-budget suggestion as infeasible (``constraints_func``) would instead spend a trial on every infeasible
suggestion, and telling a FAILed suggestion plus ``add_trial`` of the repaired plan would hide the evaluated
trial from NSGA-II (its populations are the trials the sampler itself numbered into generations). Repairing
in ``sample_relative`` keeps one trial per evaluation, whose parameters are the plan that was scored.

Only Optuna's public sampler interface is used (``BaseSampler`` and the wrapped sampler's public methods,
``BaseGASampler.get_trial_generation`` among them):
the wrapped sampler proposes (its children for the whole space; what it leaves out, the first generation's
and mutated parameters, comes from its ``sample_independent`` in the order the objective suggests them, as
without the wrapper), then ``repair`` maps the whole parameter set into the budget.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def _base_sampler():
    from optuna.samplers import BaseSampler

    return BaseSampler


def repairing_sampler(inner, space: dict, repair: Callable[[dict[str, Any]], dict[str, Any]],
                      on_new_trial: Callable[[Any, Any], None] | None = None):
    """``inner`` (an Optuna sampler) whose relative proposals over ``space`` (name → distribution, in the
    order the objective suggests them) are passed through ``repair`` (params → params within the budget).
    ``.repaired[trial number]`` says whether repair changed that trial's proposal. ``on_new_trial(study,
    trial)`` runs first thing for each trial (Optuna calls ``before_trial`` as soon as it creates one)."""

    class RepairingSampler(_base_sampler()):
        def __init__(self) -> None:
            self.inner, self.space, self.repair = inner, dict(space), repair
            self.repaired: dict[int, bool] = {}

        def __str__(self) -> str:
            return f"Repairing({self.inner})"

        def infer_relative_search_space(self, study, trial) -> dict:
            return dict(self.space)

        def sample_relative(self, study, trial, search_space: dict) -> dict[str, Any]:
            proposed = self.inner.sample_relative(study, trial, search_space)
            params = {name: proposed[name] if name in proposed else
                      self.inner.sample_independent(study, trial, name, distribution)
                      for name, distribution in search_space.items()}
            fixed = self.repair(params)
            self.repaired[trial.number] = fixed != params
            return fixed

        def sample_independent(self, study, trial, param_name: str, param_distribution) -> Any:
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            if on_new_trial is not None:
                on_new_trial(study, trial)
            # Number every trial into NSGA-II's generations here: Optuna never calls sample_relative for an enqueued
            # trial (all its params fixed), so NSGA-II would leave the warm start out of its populations and breed
            # only from the random trials after it. Numbered, the warm start is the first generation.
            generation = getattr(self.inner, "get_trial_generation", None)
            if generation is not None:
                generation(study, trial)
            self.inner.before_trial(study, trial)

        def after_trial(self, study, trial, state, values: Sequence[float] | None) -> None:
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self) -> None:
            self.inner.reseed_rng()

    return RepairingSampler()
