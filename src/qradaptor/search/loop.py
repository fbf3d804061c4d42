"""The search loop on Optuna studies: exploration (warm start + NSGA-II, or random), promotion of the cheap
front to the expensive fidelity, and Bayesian refinement among one-edit neighbours."""

from __future__ import annotations

import datetime
import logging
import threading
import time
import warnings
from contextlib import contextmanager

import numpy as np

from ..backends import backend_for
from ..memory import ModelShapes, format_bytes, predict
from ..plan import LayerChoice, Plan
from ..profile import Sensitivity
from .config import CONFIG_ATTR, FORMAT, Fidelity, SearchConfig, SearchError
from .fitness import Fitness
from .genes import plan_key
from .planner import Planner, PriorCost, group_error_ratios, plan_from_key
from .report import Evaluated, SearchResult, measured_uniform, pareto_front
from .sampler import repairing_sampler
from .storage import (_config_fingerprint, _dead_here, _fail, _heartbeat, _whoami, grace_seconds, open_storage,
                      trial_id)

log = logging.getLogger("qradaptor")


#: The warm start's plan that fills the whole budget by the sensitivity profile (the greedy allocator's plan).
PRIOR_FILL = "prior-1.00"


def is_anchor(source: str) -> bool:
    """A warm-start plan that promotion always re-evaluates at the expensive fidelity: a uniform setting that fits,
    or the profile's fill of the whole budget."""
    return source.startswith("uniform-") or source == PRIOR_FILL


class Search:
    """One search: a study in storage, a planner for the budget, and a fitness to evaluate plans."""

    def __init__(self, *, model, sensitivity: Sensitivity, config: SearchConfig, storage: str, study_name: str,
                 fitness: Fitness, run_config: dict | None = None, progress: bool = True, seed_offset: int = 0):
        from ..models import model_fingerprint

        self.config, self.fitness, self.progress = config, fitness, progress
        self.seed_offset = seed_offset  # workers sample with their own stream (the seed alone would repeat plans)
        self.model_fp = model_fingerprint(model)
        if sensitivity.model_fingerprint != self.model_fp:
            from ..profile import weights_dtype

            profiled, searched = sensitivity.settings.get("model_dtype"), weights_dtype(model)
            if profiled and profiled != searched:
                raise SearchError(
                    f"the sensitivity profile was measured on the model in {profiled} and this search computes in "
                    f"{searched} (a profile is of the model's weights as loaded)",
                    f"profile with --dtype {searched}, or search with --dtype {profiled}")
            raise SearchError(
                f"the sensitivity profile was made for another model (fingerprint {sensitivity.model_fingerprint[:12]}…, "
                f"this model is {self.model_fp[:12]}…)",
                "profile this model (qradaptor profile --model M --out DIR) or point --sensitivity at its profile")
        _check_fitness_config(fitness, config)
        # plans priced as the fitness stores them: in the model's dtype (bf16 scales and zeros for a bf16 search)
        self.backend = backend_for(model, config.backend)
        for b in config.bits:
            if b < 16:
                self.backend.check_bits(b)
        self.shapes = ModelShapes.from_model(model)
        # a group-size gene is priced by each linear's weights (group_error_ratios), measured here once
        ratios = group_error_ratios(model, config.group_sizes, config.group_size) if config.group_sizes else None
        self.planner = Planner(self.shapes, self.backend,
                               PriorCost(sensitivity, config, shapes=self.shapes, group_ratios=ratios), config)
        self.L = self.shapes.num_layers
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.run_config = {**(run_config or {}), **config.to_dict(), "model_fingerprint": self.model_fp,
                           "dtype": str(self.backend.compute_dtype).removeprefix("torch."),
                           "sensitivity": sensitivity.to_dict(), "format": FORMAT}
        self.study = self._open_study(study_name, "explore", ["minimize", "minimize"])
        self.refine_study = self._open_study(study_name + ":refine", "refine", ["minimize", "minimize"])
        self._evaluations: dict[tuple[str, str], float] = {}

    def _open_study(self, name: str, role: str, directions: list[str]):
        import optuna

        def sampler(seed: int):
            if role != "explore":  # the refine study's trials are all enqueued: its sampler never proposes
                return optuna.samplers.RandomSampler(seed=seed)
            inner = (optuna.samplers.NSGAIISampler(population_size=self.config.population, seed=seed)
                     if self.config.sampler == "nsga2" else optuna.samplers.RandomSampler(seed=seed))
            # proposals are repaired into the budget before they become the trial's params (see sampler.py)
            return repairing_sampler(inner, self.space(), self._repair_params, on_new_trial=self._claim)

        seed = self.config.seed + self.seed_offset
        study = optuna.create_study(storage=self.storage, study_name=name, directions=directions, sampler=sampler(seed),
                                    load_if_exists=True)
        if study.trials:  # resumed or joined: a fresh random stream, not a replay of the first trials' samples
            study.sampler = sampler(seed + len(study.trials))
        existing = study.user_attrs.get(CONFIG_ATTR)
        if existing is None:
            study.set_user_attr(CONFIG_ATTR, self.run_config)
        else:
            mine, theirs = _config_fingerprint(self.run_config), _config_fingerprint(existing)
            # studies made before data contents were fingerprinted have none: compare the rest
            differ = [k for k in mine if mine[k] != theirs.get(k)
                      and not (k == "data_fingerprint" and theirs.get(k) is None)]
            if differ == ["data_fingerprint"]:
                data = self.run_config.get("data") or "the default data"
                raise SearchError(
                    f"the contents of {data} changed since study {name!r} began (same path, different data): "
                    "its trials were scored on the old data",
                    "restore the original data to resume, or search the new data with another --out (or --study)")
            if differ:
                raise SearchError(
                    f"study {name!r} in this storage belongs to a different search "
                    f"({', '.join('data contents' if k == 'data_fingerprint' else k for k in differ)} differ)",
                    "use another --study name (or --out directory), or rerun with the original settings to resume")
        return study

    # ---------------------------------------------------------------- evaluation

    def _suggest(self, trial) -> Plan:
        return self.plan_of({name: trial.suggest_categorical(name, d.choices) for name, d in self.space().items()})

    def params(self, plan: Plan) -> dict:
        """The Optuna parameters of ``plan`` (its gene values: `genes.Genes`)."""
        return self.planner.genes.params(self.planner.genes.values(plan))

    def _known_loss(self, study, key: str, fidelity: str) -> float | None:
        from optuna.trial import TrialState

        if (key, fidelity) in self._evaluations:
            return self._evaluations[(key, fidelity)]
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("plan_key") == key and t.user_attrs.get("fidelity") == fidelity:
                return t.values[0]
        return None

    def _evaluate(self, trial, plan: Plan, fidelity: Fidelity, source: str, study) -> tuple[float, int]:
        """Evaluate ``plan`` (already within budget) and record it on ``trial``; reuse an earlier identical one."""
        key = plan_key(plan)
        memory = self.planner.memory(plan)
        assert memory <= self.config.budget_bytes, "plans are repaired before evaluation"
        known = self._known_loss(study, key, fidelity.name)
        steps = 0
        if known is None:
            loss, steps = self.fitness(plan, fidelity)
        else:
            loss = known
        self._evaluations[(key, fidelity.name)] = loss
        report = predict(self.shapes, plan, self.backend)
        for k, v in {"plan_key": key, "fidelity": fidelity.name, "memory_bytes": memory, "avg_bits": report.avg_bits,
                     "source": source, "fine_tune_steps": steps, "reused": known is not None,
                     "worker": _whoami()}.items():
            trial.set_user_attr(k, v)
        return loss, memory

    def space(self) -> dict:
        """The exploration's parameters (name → distribution), in the order ``_suggest`` asks for them."""
        return self.planner.genes.space(self.config.bits, self.config.ranks)

    def plan_of(self, params: dict) -> Plan:
        return self.planner.plan_of(self.planner.genes.values_of(params))

    def _repair_params(self, params: dict) -> dict:
        return self.params(self.planner.repair(self.plan_of(params), self.config.budget_bytes))

    def _claim(self, study, trial) -> None:
        """Tag a just-created trial with its process (before it is sampled), so that if this process dies a
        rerun on this machine sees at once that the trial's process is gone."""
        self.storage.set_trial_user_attr(trial_id(self.storage, study, trial), "worker", _whoami())

    def objective(self, trial) -> tuple[float, int]:
        """Evaluate the trial's plan. Its params are already within the budget (the sampler repairs what NSGA-II
        proposes), so the plan scored is the plan NSGA-II breeds from."""
        import optuna

        plan = self._suggest(trial)
        source = trial.user_attrs.get("source", "nsga2")
        repaired = self.planner.repair(plan, self.config.budget_bytes)
        if plan_key(repaired) != plan_key(plan):
            # Only enqueued params can be over budget (a trial retried from a study begun before proposals were
            # repaired): evaluate their repaired plan as a trial of its own, and prune this one unscored.
            self.study.enqueue_trial(self.params(repaired), user_attrs={"source": source})
            raise optuna.TrialPruned("over the budget; its repaired plan is enqueued")
        trial.set_user_attr("repaired", bool(getattr(self.study.sampler, "repaired", {}).get(trial.number, False)))
        return self._evaluate(trial, plan, self.config.cheap, source, self.study)

    # ---------------------------------------------------------------- stages

    def uniform_plans(self) -> list[tuple[Plan, str]]:
        """The uniform settings a user would pick by hand in this budget: for each of the two largest bit-widths
        that fit at some rank, every layer at that width with the largest rank that fits (fewer bits with larger
        adapters lose far more: on SmolLM2 uniform 3-bit r16 ends far behind uniform 4-bit r16 after the same
        fine-tune, benchmarks/results/frontier.md). The search must beat the best of them, so they are its first
        trials, and all of them are promoted."""
        plans = []
        for b in sorted(self.config.bits, reverse=True):
            fits = [r for r in self.config.ranks
                    if self.planner.memory(self.planner.plan([LayerChoice(b, r)] * self.L)) <= self.config.budget_bytes]
            if fits:
                plans.append((self.planner.plan([LayerChoice(b, max(fits))] * self.L), f"uniform-{b}bit-r{max(fits)}"))
            if len(plans) == 2:
                break
        return plans

    def warm_start_plans(self) -> list[tuple[Plan, str]]:
        plans, budget = self.uniform_plans(), self.config.budget_bytes
        floor = self.planner.memory(self.planner.plan([LayerChoice(self.config.bits[0], self.config.ranks[0])] * self.L))
        n = self.config.warm_start
        for i in range(n):
            fraction = 1.0 if n == 1 else 0.7 + 0.3 * i / (n - 1)
            source = PRIOR_FILL if i == n - 1 else f"prior-{fraction:.2f}"
            plans.append((self.planner.fill(floor + int(fraction * (budget - floor))), source))
        unique, seen = [], set()
        for plan, source in plans:
            if plan_key(plan) not in seen:
                seen.add(plan_key(plan))
                unique.append((plan, source))
        return unique

    def explore(self, warm_start: bool = True) -> None:
        """Run exploration trials (this process; workers may add theirs) until the study has ``trials``.
        Only the coordinating search enqueues the warm start (``warm_start``), so a worker never duplicates it."""
        import optuna
        from optuna.trial import TrialState

        if warm_start and not self.study.trials and self.config.sampler == "nsga2":
            first = self.warm_start_plans()[: self.config.trials]
            for plan, source in first:
                self.study.enqueue_trial(self.params(plan), user_attrs={"source": source})
            self._prefit([plan for plan, _ in first])
        self._fail_dead_trials()
        done = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        remaining = self.config.trials - done
        if remaining <= 0:
            return
        bar = _progress(self.config.trials, done, "search: explore", self.progress)
        try:
            self.study.optimize(self.objective, n_trials=None, gc_after_trial=False,
                                callbacks=[optuna.study.MaxTrialsCallback(self.config.trials, states=(TrialState.COMPLETE,)),
                                           lambda study, trial: bar.update(1, self._best(study)),
                                           lambda study, trial: self._prune_runs(self._may_be_promoted())])
        finally:
            bar.close()

    def _prefit(self, plans: list[Plan]) -> None:
        """Have the fitness fit the adapter starts of the warm start's plans in one calibration forward, not one per
        bit-width as their trials come (~15 s saved per width after the first on SmolLM2, results/trial_cost.md)."""
        prefit = getattr(self.fitness, "prefit", None)
        if prefit is None:
            return
        log.info("search: quantizing and fitting the adapter starts of the first %d plans", len(plans))
        started = time.perf_counter()
        fitted = prefit(plans)
        if fitted:
            log.info("search: fitted %d adapter starts for the first %d plans in one pass (%.0f s)", fitted,
                     len(plans), time.perf_counter() - started)

    def _fail_dead_trials(self) -> None:
        """Fail exploration trials left RUNNING by a process that died, so the storage's retry callback
        re-enqueues their plans. A trial can be a live worker's (on this machine or another), so it is failed
        only when its process is known dead: on this machine at once (its pid is gone), elsewhere once its
        heartbeat is older than the grace period (Optuna's fail_stale_trials, which optimize() also runs), and
        a trial never tagged with its process (created, then killed before ``_claim``) once it is that old."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        retry = self.storage.get_heartbeat_stale_trial_callback()
        grace = datetime.timedelta(seconds=grace_seconds(self.storage))
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("worker")
            # untagged past the grace period: its process died between creating the trial and tagging it
            untagged = worker is None and t.datetime_start is not None and datetime.datetime.now() - t.datetime_start > grace
            if untagged or _dead_here(worker or ""):
                tid = trial_id(self.storage, self.study, t)
                if _fail(self.storage, tid) and retry:
                    retry(self.study, self.storage.get_trial(tid))

    @contextmanager
    def coordinating(self):
        """Hold the study's coordinator lease while warm start, promotion and refinement run: those stages
        must run in one process (two would evaluate the same refinement plans). The lease is a RUNNING trial
        with a heartbeat in the study ``NAME:coordinator``; another search of the same study is refused while
        it lives (``qradaptor worker`` joins the exploration instead), and a crashed holder's lease expires like
        a trial's (at once when its process on this machine is gone, else after the grace period)."""
        import optuna
        from optuna.trial import TrialState, create_trial

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            leases = optuna.create_study(storage=self.storage, study_name=self.study.study_name + ":coordinator",
                                         load_if_exists=True)
            optuna.storages.fail_stale_trials(leases)
        for t in leases.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if t.state == TrialState.WAITING or _dead_here(t.user_attrs.get("worker", "")):
                # WAITING: the retry callback's copy of a stale lease
                _fail(self.storage, trial_id(self.storage, leases, t))
        holder = {"worker": _whoami(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        lease = self.storage.create_new_trial(self.storage.get_study_id_from_name(leases.study_name),
                                              template_trial=create_trial(state=TrialState.RUNNING, user_attrs=holder))
        lease_number = self.storage.get_trial_number_from_id(lease)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(self.storage, lease, stop), daemon=True)
        beat.start()
        started = time.perf_counter()
        try:
            # Two searches may have created leases at once: the earliest live one wins.
            first = min(leases.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), key=lambda t: t.number)
            if first.number != lease_number:
                host, _, pid = first.user_attrs.get("worker", "?:?").rpartition(":")
                grace = grace_seconds(self.storage)
                raise SearchError(
                    f"study {self.study.study_name!r} is already being searched by process {pid} on {host} "
                    f"(since {first.user_attrs.get('started', '?')}); two searches of one study would evaluate "
                    "the same plans and overwrite each other's results",
                    "wait for that search to finish, or add evaluators to it with `qradaptor worker --storage URL "
                    f"--study {self.study.study_name}`; if that process is gone, its claim expires {grace} s after "
                    "its last heartbeat")
            # Only a coordinator writes the refine study: what a crashed one left RUNNING or WAITING is orphaned
            # (and a WAITING trial would be popped by the next ask() in place of the plan just enqueued).
            for t in self.refine_study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                _fail(self.storage, trial_id(self.storage, self.refine_study, t))
            yield
        finally:
            stop.set()
            beat.join()
            # the run's record in the coordinator study, its value the seconds it held the lease
            if not _fail(self.storage, lease, value=time.perf_counter() - started):
                log.warning("search: the coordinator lease of study %s had expired", self.study.study_name)

    def _best(self, study) -> str:
        best = [t for t in study.best_trials]
        if not best:
            return ""
        t = min(best, key=lambda t: t.values[0])
        return f"best loss {t.values[0]:.4f} at {format_bytes(t.values[1])}"

    def _record(self, plan: Plan, fidelity: Fidelity, source: str) -> float:
        """Evaluate ``plan`` as a trial of the refine study (enqueued params, ask/tell)."""
        key = plan_key(plan)
        known = self._known_loss(self.refine_study, key, fidelity.name)
        if known is not None:
            return known
        self.refine_study.enqueue_trial(self.params(plan), user_attrs={"source": source})
        with warnings.catch_warnings():  # heartbeats matter for optimize(); these trials are told at once
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.refine_study.ask()
        for name, distribution in self.space().items():  # the enqueued values
            trial.suggest_categorical(name, distribution.choices)
        loss, memory = self._evaluate(trial, plan, fidelity, source, self.refine_study)
        self.refine_study.tell(trial, [loss, memory])
        return loss

    def to_promote(self) -> list[Evaluated]:
        """The cheap-fidelity points that `promote` evaluates at the expensive fidelity (as things stand)."""
        cheap = [p for p in self.points() if p.fidelity == "cheap"]
        if not cheap:
            return []
        front = sorted(pareto_front(cheap), key=lambda p: self.scalarize(p.loss, p.memory_bytes, cheap))
        chosen = front[: self.config.promote]
        # The warm start's anchors too, whatever their cheap loss: the uniform settings (the plans to beat are
        # compared at the fidelity the choice is made at; the best after the cheap fine-tune mis-ranks rank-4
        # adapters: in the demo, uniform 5-bit r4 ahead of 4-bit r16 after 3 steps, behind after 10 and after the
        # final 20) and the profile's fill of the whole budget (the cheap fidelity ranks the close plans at the top
        # poorly: the fidelity study's prefix@4 has Spearman 0.78 over the better half of 24 plans, and the 4-bit
        # budget's greedy fill, never promoted by the frontier's search, trained to the best final of them).
        chosen += [p for p in cheap if is_anchor(p.source) and p not in chosen]
        # The refinement's surrogate needs two full-fidelity points: where that leaves fewer (a uniform setting is
        # itself the promoted plan), promote more of the front rather than skip refinement.
        more = [p for p in front if p not in chosen]
        while self.config.refine and len(chosen) < 2 and more:
            chosen.append(more.pop(0))
        return chosen

    def _may_be_promoted(self) -> list[Plan]:
        """Plans whose kept runs promotion may still continue: the cheap front (a dominated plan stays dominated,
        while the order along the front shifts as points arrive, so the front's best few so far is not enough)
        and the warm start's anchors (see `to_promote`)."""
        cheap = [p for p in self.points() if p.fidelity == "cheap"]
        return [p.plan for p in pareto_front(cheap) + [p for p in cheap if is_anchor(p.source)]]

    def _prune_runs(self, keep: list[Plan]) -> None:
        """Delete the kept prefix runs (`FineTuneFitness`) of every plan but ``keep``'s: disk, not correctness."""
        prune = getattr(self.fitness, "prune", None)
        if prune is not None:
            prune(keep)

    def promote(self) -> None:
        chosen = self.to_promote()
        # the runs of the plans promoted now are continued; the rest would never be
        self._prune_runs([p.plan for p in chosen] + [p.plan for p in self.points() if p.fidelity == "full"])
        bar = _progress(len(chosen), 0, "search: promote", self.progress)
        for p in chosen:
            self._record(p.plan, self.config.full, p.source if is_anchor(p.source) else "promotion")
            bar.update(1)
        bar.close()

    def refine(self) -> None:
        from ..gp import GaussianProcess, expected_improvement

        done = sum(p.source == "refine" for p in self.points())  # a resumed search continues its count
        bar = _progress(self.config.refine, done, "search: refine", self.progress)
        for _ in range(self.config.refine - done):
            full = [p for p in self.points() if p.fidelity == "full"]
            if len(full) < 2:
                break
            evaluated = {plan_key(p.plan) for p in full}
            candidates = {plan_key(c): c for p in pareto_front(full)
                          for c in self.planner.neighbours(p.plan, self.config.budget_bytes)
                          if plan_key(c) not in evaluated}
            if not candidates:
                break
            gp = GaussianProcess().fit(np.stack([self.planner.encode(p.plan) for p in full]),
                                       np.array([p.loss for p in full]))
            cand = list(candidates.values())
            mu, sigma = gp.predict(np.stack([self.planner.encode(c) for c in cand]))
            memories = np.array([self.planner.memory(c) for c in cand])
            lo, span = self._loss_scale(full)
            mem_lo, mem_span = self._memory_scale()
            a = self.config.alpha
            y_mu = a * (mu - lo) / span + (1 - a) * (memories - mem_lo) / mem_span
            y_sigma = a * sigma / span
            best = min(self.scalarize(p.loss, p.memory_bytes, full) for p in full)
            ei = expected_improvement(y_mu, y_sigma, best)
            pick = cand[int(np.argmax(ei))]
            self._record(pick, self.config.full, "refine")
            bar.update(1, f"EI {ei.max():.4f}")
        bar.close()

    # ---------------------------------------------------------------- results

    def _loss_scale(self, points: list[Evaluated]) -> tuple[float, float]:
        losses = [p.loss for p in points]
        return min(losses), max(max(losses) - min(losses), 1e-6)

    def _memory_scale(self) -> tuple[float, float]:
        floor = self.planner.memory(self.planner.plan([LayerChoice(self.config.bits[0], self.config.ranks[0])] * self.L))
        return floor, max(self.config.budget_bytes - floor, 1)

    def scalarize(self, loss: float, memory: int, among: list[Evaluated]) -> float:
        lo, span = self._loss_scale(among)
        mem_lo, mem_span = self._memory_scale()
        return self.config.alpha * (loss - lo) / span + (1 - self.config.alpha) * (memory - mem_lo) / mem_span

    def points(self) -> list[Evaluated]:
        from optuna.trial import TrialState

        out = []
        for study in (self.study, self.refine_study):
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                out.append(Evaluated(plan_from_key(t.user_attrs["plan_key"], self.config),
                                     int(t.user_attrs["memory_bytes"]), float(t.user_attrs["avg_bits"]), t.values[0],
                                     t.user_attrs["fidelity"], t.user_attrs.get("source", ""), t.number))
        return out

    def fine_tune_steps(self) -> int:
        from optuna.trial import TrialState

        return sum(int(t.user_attrs.get("fine_tune_steps", 0)) for s in (self.study, self.refine_study)
                   for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def run(self) -> SearchResult:
        start = time.perf_counter()
        with self.coordinating():
            self.explore()
            self.promote()
            self.refine()
        points = self.points()
        full = [p for p in points if p.fidelity == "full"] or [p for p in points if p.fidelity == "cheap"]
        chosen = min(full, key=lambda p: (self.scalarize(p.loss, p.memory_bytes, full), p.memory_bytes))
        # The final fine-tune continues the chosen plan's run. The uniform settings' runs are kept too: they are
        # the baselines a user compares the plan with, and `train --init-from` continues them the same way.
        uniform = {p.source: p.plan for p in measured_uniform(points)}
        self._prune_runs([chosen.plan, *uniform.values()])
        kept = self._kept(chosen.plan)
        return SearchResult(chosen, points, self.config.budget_bytes, self.fine_tune_steps(),
                            time.perf_counter() - start, self.run_config,
                            kept_run=kept[0] if kept else None, kept_step=kept[1] if kept else 0,
                            uniform_runs={s: k for s, plan in uniform.items() if (k := self._kept(plan))})

    def _kept(self, plan: Plan) -> tuple[str, int] | None:
        """``plan``'s kept run and the step it is at, when the fitness keeps one."""
        step = getattr(self.fitness, "kept_step", lambda plan: 0)(plan)
        return (str(self.fitness.kept_run(plan)), step) if step else None


class _progress:
    """A tqdm bar that shows the best point so far."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="trial", disable=not enabled)

    def update(self, n: int, best: str = "") -> None:
        self.bar.update(n)
        if best:
            self.bar.set_postfix_str(best)

    def close(self) -> None:
        self.bar.close()


#: The settings a fitness fine-tunes with that the study records as the search's: they must agree.
FITNESS_SETTINGS = ("adapter_init", "start_tokens", "seed", "seq_len", "backend")


def _check_fitness_config(fitness, config: SearchConfig) -> None:
    """Refuse a fitness that fine-tunes with other settings than the search records (a `FineTuneFitness` uses its
    own config's adapter start, seed, block length and backend, whatever the search's config says)."""
    own = getattr(fitness, "config", None)  # a plain callable fitness has none: nothing to compare
    differ = [k for k in FITNESS_SETTINGS if hasattr(own, k) and getattr(own, k) != getattr(config, k)]
    if differ:
        shown = ", ".join(f"{k}: fitness {getattr(own, k)!r}, search {getattr(config, k)!r}" for k in differ)
        raise SearchError(f"the fitness fine-tunes with other settings than this search records ({shown})",
                          "give the fitness the search's settings (FineTuneFitness.with_start for the adapter start), "
                          "or let the search make its own")
