"""Stages 2–3: the budget-constrained search for a plan, on Optuna storage.

1. Warm start: uniform plans that fit, and plans filled greedily from the sensitivity prior at several
   fractions of the budget (sensitive layers get bits and ranks first).
2. Exploration: NSGA-II over per-layer bits and ranks. Every suggested plan is repaired into the budget
   (deterministically: lower the bit-width or rank that costs least prior sensitivity per byte saved),
   so an infeasible plan never gets a fine-tune; objectives are (held-out loss after a *cheap* fine-tune,
   memory). Identical repaired plans are evaluated once.
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
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends import QuantBackend, QuantCache, get_backend
from .errors import BudgetError, QRAdaptorError
from .io import atomic_write_json, atomic_write_text
from .memory import (ADAPTER_STATE_BYTES, ModelShapes, format_bytes, layer_bytes, parse_budget, parse_training_budget,
                     predict, training_memory)
from .plan import DEFAULT_BIT_LADDER, DEFAULT_RANK, LayerChoice, Plan
from .profile import Sensitivity

log = logging.getLogger("qradaptor")

DEFAULT_BITS = DEFAULT_BIT_LADDER  # (2, 3, 4, 5, 6, 8): exact packing makes 5 and 6 bits worth their bytes
DEFAULT_RANKS = (4, 8, 16, 32)
CONFIG_ATTR = "qradaptor_config"
FORMAT = "qradaptor-search-1"
#: Written into every --out a search uses: marks the directory as the tool's, and is locked (flock) for the
#: search's duration so that a second search on the same --out is refused instead of overwriting the first.
MARKER = ".qradaptor-search"
#: What a search writes into its --out (a directory that holds study.db but no marker is an older search's).
SEARCH_FILES = ("study.db", "pareto.json", "plan.json", "pareto.png", "search-summary.txt")


class SearchError(QRAdaptorError):
    """The search cannot run as asked."""


# ---------------------------------------------------------------------------------------- config


@dataclass
class Fidelity:
    name: str
    steps: int
    eval_blocks: int
    batch_size: int = 4
    lr: float = 3e-4


@dataclass
class SearchConfig:
    budget_bytes: int
    bits: tuple[int, ...] = DEFAULT_BITS
    ranks: tuple[int, ...] = DEFAULT_RANKS
    alpha: float = 0.5  # 1: only quality matters; 0: only memory
    trials: int = 24  # exploration trials (warm start included), cheap fidelity
    population: int = 8
    promote: int = 3  # cheap-front plans re-evaluated at the expensive fidelity
    refine: int = 3  # Bayesian refinement iterations, expensive fidelity
    warm_start: int = 4  # prior-greedy plans at fractions of the budget
    cheap: Fidelity = field(default_factory=lambda: Fidelity("cheap", steps=8, eval_blocks=8))
    full: Fidelity = field(default_factory=lambda: Fidelity("full", steps=24, eval_blocks=16))
    seq_len: int = 256
    group_size: int = 64
    backend: str = "hqq"
    rank_value: float = 1 / 3
    gradient_checkpointing: bool = True  # in the search's fine-tunes (see TrainConfig)
    # "stored": the budget is on the stored model (predict); "training": on the predicted training peak, i.e.
    # stored bytes + adapter gradients and AdamW state (12 bytes per trainable parameter) + training_fixed_bytes
    # (runtime, activations at the largest rank, loss: memory.training_memory for train_batch_size × seq_len).
    budget_on: str = "stored"
    training_fixed_bytes: int = 0
    train_batch_size: int = 4
    sampler: str = "nsga2"  # exploration sampler: "nsga2", or "random" (the baseline the benchmark compares to)
    seed: int = 0

    def __post_init__(self) -> None:
        self.bits, self.ranks = tuple(sorted(self.bits)), tuple(sorted(self.ranks))
        for key in ("cheap", "full"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, Fidelity(**value))
        if not 0 <= self.alpha <= 1:
            raise SearchError(f"--alpha must be between 0 and 1, got {self.alpha}", "0.5 weighs quality and memory equally")
        if self.budget_on not in ("stored", "training"):
            raise SearchError(f"unknown budget kind {self.budget_on!r}", "use stored or training")
        if self.sampler not in ("nsga2", "random"):
            raise SearchError(f"unknown sampler {self.sampler!r}", "use nsga2 or random")
        if self.trials < 1 or self.population < 2:
            raise SearchError("the search needs at least 1 trial and a population of 2", "e.g. --trials 24 --population 8")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"], d["ranks"] = list(self.bits), list(self.ranks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        return cls(**{**d, "bits": tuple(d["bits"]), "ranks": tuple(d["ranks"])})


# ---------------------------------------------------------------------------------------- cost model


class PriorCost:
    """Prior sensitivity of a plan's choices, from the profile, for repair and warm start."""

    def __init__(self, sensitivity: Sensitivity, config: SearchConfig):
        self.kl = sensitivity.kl
        self.config = config
        self.scale = [max(k.get(4, max(k.values())), 1e-9) for k in self.kl]  # a layer's importance

    def bits_cost(self, layer: int, bits: int) -> float:
        if bits >= 8:
            return 0.0
        table = self.kl[layer]
        if bits in table:
            return table[bits]
        # Unprofiled bit-width: interpolate log-KL linearly in bits between the nearest profiled ones (8 → 0).
        known = sorted(table)
        lo = max((b for b in known if b < bits), default=known[0])
        hi = min((b for b in known if b > bits), default=None)
        if hi is None:
            return table[lo] * 4.0 ** -(bits - lo)  # ~4x less KL per extra bit (3.3-4.5x: benchmarks/results/backends.md)
        t = (bits - lo) / (hi - lo)
        return math.exp((1 - t) * math.log(table[lo]) + t * math.log(max(table[hi], 1e-12)))

    def rank_cost(self, layer: int, rank: int) -> float:
        top = max(self.config.ranks)
        return self.config.rank_value * self.scale[layer] * math.log2(top / rank)

    def layer_cost(self, layer: int, choice: LayerChoice) -> float:
        return self.bits_cost(layer, choice.bits) + self.rank_cost(layer, choice.rank)



class Planner:
    """Memory and prior cost of plans, repair into a budget, greedy fill from the cheapest plan."""

    def __init__(self, shapes: ModelShapes, backend: QuantBackend, cost: PriorCost, config: SearchConfig):
        self.shapes, self.backend, self.cost, self.config = shapes, backend, cost, config
        self._layer_bytes: dict[tuple[int, int, int], int] = {}
        # every plan the planner makes has these settings (target modules, group size): price them as predict does
        self.template = Plan.uniform(shapes.num_layers, config.bits[0], config.ranks[0], group_size=config.group_size)
        report = predict(shapes, self.template, backend)
        self.fixed_bytes = report.other_bytes + config.training_fixed_bytes
        # bytes per trainable parameter: the adapter (fp32, as predict prices it), plus its gradient and AdamW's
        # moments when the budget is on the training peak
        self.param_bytes = 4 + (ADAPTER_STATE_BYTES if config.budget_on == "training" else 0)

    def layer_bytes(self, layer: int, choice: LayerChoice) -> int:
        """`memory.layer_bytes`, memoised (the search prices the same layer choices thousands of times)."""
        key = (layer, choice.bits, choice.rank)
        if key not in self._layer_bytes:
            weights, params = layer_bytes(self.shapes.layers[layer], choice, self.backend,
                                          group_size=self.template.group_size,
                                          target_modules=self.template.target_modules,
                                          base_bytes=self.backend.metadata_bytes)
            self._layer_bytes[key] = weights + params * self.param_bytes
        return self._layer_bytes[key]

    def memory(self, plan: Plan) -> int:
        return self.fixed_bytes + sum(self.layer_bytes(l, c) for l, c in enumerate(plan.layers))

    def plan(self, choices: list[LayerChoice]) -> Plan:
        return Plan(list(choices), group_size=self.template.group_size, target_modules=self.template.target_modules)

    def _moves(self, choices: list[LayerChoice], direction: int):
        """One-rung moves (down: -1, up: +1) with their (Δcost, Δbytes)."""
        bits, ranks = self.config.bits, self.config.ranks
        for l, c in enumerate(choices):
            bi, ri = bits.index(c.bits), ranks.index(c.rank)
            for new in ((bits[bi + direction], c.rank) if 0 <= bi + direction < len(bits) else None,
                        (c.bits, ranks[ri + direction]) if 0 <= ri + direction < len(ranks) else None):
                if new is None:
                    continue
                n = LayerChoice(*new)
                yield l, n, self.cost.layer_cost(l, n) - self.cost.layer_cost(l, c), \
                    self.layer_bytes(l, n) - self.layer_bytes(l, c)

    def repair(self, plan: Plan, budget: int) -> Plan:
        """While over budget, take the one-rung step down that costs least prior per byte saved."""
        choices = list(plan.layers)
        memory = self.memory(plan)
        while memory > budget:
            moves = [(dc / -db, l, n, db) for l, n, dc, db in self._moves(choices, -1) if db < 0]
            if not moves:
                raise SearchError(f"no plan in the search space fits {format_bytes(budget)}",
                                  "raise the budget or allow fewer bits / smaller ranks")
            _, l, n, db = min(moves, key=lambda m: (m[0], m[1], m[2].bits, m[2].rank))
            choices[l] = n
            memory += db
        return self.plan(choices)

    def fill(self, budget: int) -> Plan:
        """From the cheapest plan, take the one-rung step up that buys most prior per byte, while it fits."""
        choices = [LayerChoice(self.config.bits[0], self.config.ranks[0])] * self.shapes.num_layers
        memory = self.memory(self.plan(choices))
        while True:
            moves = [(-dc / db, l, n, db) for l, n, dc, db in self._moves(choices, +1)
                     if db > 0 and memory + db <= budget and dc < 0]
            if not moves:
                return self.plan(choices)
            _, l, n, db = max(moves, key=lambda m: (m[0], -m[1], -m[2].bits, -m[2].rank))
            choices[l] = n
            memory += db

    def neighbours(self, plan: Plan, budget: int) -> list[Plan]:
        """Plans one rung away in one layer's bits or rank, repaired into the budget."""
        out, seen = [], {plan_key(plan)}
        for direction in (-1, +1):
            for l, n, _, _ in self._moves(list(plan.layers), direction):
                choices = list(plan.layers)
                choices[l] = n
                candidate = self.repair(self.plan(choices), budget)
                if plan_key(candidate) not in seen:
                    seen.add(plan_key(candidate))
                    out.append(candidate)
        return out

    def encode(self, plan: Plan) -> np.ndarray:
        bits, ranks = self.config.bits, self.config.ranks
        return np.array([v for c in plan.layers for v in (bits.index(c.bits) / max(1, len(bits) - 1),
                                                          ranks.index(c.rank) / max(1, len(ranks) - 1))])


def plan_key(plan: Plan) -> str:
    return ",".join(f"{c.bits}/{c.rank}" for c in plan.layers)


def plan_from_key(key: str, group_size: int) -> Plan:
    return Plan([LayerChoice(*map(int, item.split("/"))) for item in key.split(",")], group_size=group_size)


# ---------------------------------------------------------------------------------------- fitness

#: fitness(plan, fidelity) -> (held-out loss, fine-tune steps spent)
Fitness = Callable[[Plan, Fidelity], "tuple[float, int]"]


class FineTuneFitness:
    """The real objective: a short LoRA fine-tune of the plan on the quantized base, then held-out loss.
    Every plan sees the same data order (same seed), so differences come from the plan."""

    def __init__(self, model, tokenizer, *, data: str | None, config: SearchConfig, progress: bool = False):
        from .data import load_blocks

        self.model, self.config, self.progress = model, config, progress
        self.cache = QuantCache(get_backend(config.backend))
        self.train_blocks = load_blocks(data, tokenizer, "train", seq_len=config.seq_len, seed=config.seed)
        self.eval_blocks = load_blocks(data, tokenizer, "validation", seq_len=config.seq_len, seed=config.seed)

    def __call__(self, plan: Plan, fidelity: Fidelity) -> tuple[float, int]:
        from .evaluate import evaluate_loss
        from .quantize import prepare_model
        from .train import TrainConfig, train

        model = prepare_model(self.model, plan, cache=self.cache, seed=self.config.seed)
        train(model, self.train_blocks, TrainConfig(steps=fidelity.steps, batch_size=fidelity.batch_size,
                                                    lr=fidelity.lr, warmup_steps=max(1, fidelity.steps // 10),
                                                    seed=self.config.seed,
                                                    gradient_checkpointing=self.config.gradient_checkpointing),
              progress=False)
        result = evaluate_loss(model, self.eval_blocks.subset(min(fidelity.eval_blocks, len(self.eval_blocks))),
                               progress=False)
        return result.loss, fidelity.steps


# ---------------------------------------------------------------------------------------- storage


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats (a killed worker's trial is retried), or a clear error."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=int(os.environ.get("QRADAPTOR_HEARTBEAT", "30")),
                grace_period=int(os.environ.get("QRADAPTOR_GRACE", "90")),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
    except (SQLAlchemyError, ImportError, ValueError, OSError) as e:
        raise SearchError(f"cannot open the study storage {redact(url)}: {str(e).splitlines()[0][:300]}",
                          "check the URL, that the database server is running and reachable, and the driver "
                          "(PostgreSQL needs `pip install psycopg2-binary`)") from None


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _config_fingerprint(config: dict) -> dict:
    """What must match for a study to be continued: model, budget, space, settings (not trial counts)."""
    keep = ("model_fingerprint", "budget_bytes", "bits", "ranks", "group_size", "backend", "seq_len", "cheap",
            "full", "seed", "data", "alpha", "rank_value", "sampler", "budget_on", "train_batch_size",
            "data_fingerprint")
    return {k: config.get(k) for k in keep}


def search_data_fingerprint(data: str | None, config: SearchConfig) -> str:
    """The contents of what the fine-tunes train and are scored on (train and validation splits), so that a
    resumed search refuses data replaced at the same path instead of mixing trials scored on both."""
    from .data import data_fingerprint

    parts = [data_fingerprint(data, split, config.seq_len, seed=config.seed) for split in ("train", "validation")]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def _whoami() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(worker: str) -> bool:
    """Whether ``worker`` ("host:pid", as `_whoami` wrote it) is a process of this machine that has ended."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # a killed process its parent has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _fail(storage, trial_id: int, value: float | None = None) -> bool:
    """Fail a trial (or complete it with ``value``) unless another process finished it; whether this call did."""
    import optuna
    from optuna.trial import TrialState

    try:
        if value is not None:
            return storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _heartbeat(storage, trial_id: int, stop: threading.Event) -> None:
    interval = storage.get_heartbeat_interval() or 30
    while True:
        try:
            storage.record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001 - a missed beat only risks the lease; the search goes on
            log.warning("search: heartbeat failed (%s)", e)
        if stop.wait(interval):
            return


# ---------------------------------------------------------------------------------------- the search


@dataclass
class Evaluated:
    plan: Plan
    memory_bytes: int
    avg_bits: float
    loss: float
    fidelity: str
    source: str
    trial: int | None = None

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "memory_bytes": self.memory_bytes, "avg_bits": self.avg_bits,
                "loss": self.loss, "fidelity": self.fidelity, "source": self.source, "trial": self.trial}


@dataclass
class SearchResult:
    chosen: Evaluated
    points: list[Evaluated]
    budget_bytes: int
    fine_tune_steps: int
    seconds: float
    config: dict

    def front(self, fidelity: str) -> list[Evaluated]:
        return pareto_front([p for p in self.points if p.fidelity == fidelity])


def pareto_front(points: list[Evaluated]) -> list[Evaluated]:
    """Non-dominated points in (loss, memory), sorted by memory."""
    front = []
    for p in sorted(points, key=lambda p: (p.memory_bytes, p.loss)):
        if not front or p.loss < front[-1].loss:
            front.append(p)
    return front


class Search:
    """One search: a study in storage, a planner for the budget, and a fitness to evaluate plans."""

    def __init__(self, *, model, sensitivity: Sensitivity, config: SearchConfig, storage: str, study_name: str,
                 fitness: Fitness, run_config: dict | None = None, progress: bool = True, seed_offset: int = 0):
        import optuna

        from .models import model_fingerprint

        self.config, self.fitness, self.progress = config, fitness, progress
        self.seed_offset = seed_offset  # workers sample with their own stream (the seed alone would repeat plans)
        self.model_fp = model_fingerprint(model)
        if sensitivity.model_fingerprint != self.model_fp:
            raise SearchError(
                f"the sensitivity profile was made for another model (fingerprint {sensitivity.model_fingerprint[:12]}…, "
                f"this model is {self.model_fp[:12]}…)",
                "profile this model (qradaptor profile --model M --out DIR) or point --sensitivity at its profile")
        self.backend = get_backend(config.backend)
        for b in config.bits:
            if b < 16:
                self.backend.check_bits(b)
        self.shapes = ModelShapes.from_model(model)
        self.planner = Planner(self.shapes, self.backend, PriorCost(sensitivity, config), config)
        self.L = self.shapes.num_layers
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.run_config = {**(run_config or {}), **config.to_dict(), "model_fingerprint": self.model_fp,
                           "sensitivity": sensitivity.to_dict(), "format": FORMAT}
        self.study = self._open_study(study_name, "explore", ["minimize", "minimize"])
        self.refine_study = self._open_study(study_name + ":refine", "refine", ["minimize", "minimize"])
        self._evaluations: dict[tuple[str, str], float] = {}

    def _open_study(self, name: str, role: str, directions: list[str]):
        import optuna

        def sampler(seed: int):
            if role == "explore" and self.config.sampler == "nsga2":
                return optuna.samplers.NSGAIISampler(population_size=self.config.population, seed=seed)
            return optuna.samplers.RandomSampler(seed=seed)

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
        choices = [LayerChoice(trial.suggest_categorical(f"b{l}", list(self.config.bits)),
                               trial.suggest_categorical(f"r{l}", list(self.config.ranks))) for l in range(self.L)]
        return self.planner.plan(choices)

    @staticmethod
    def params(plan: Plan) -> dict:
        return {k: v for l, c in enumerate(plan.layers) for k, v in ((f"b{l}", c.bits), (f"r{l}", c.rank))}

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
                     "worker": f"{socket.gethostname()}:{os.getpid()}"}.items():
            trial.set_user_attr(k, v)
        return loss, memory

    def objective(self, trial) -> tuple[float, int]:
        trial.set_user_attr("worker", _whoami())  # first, so a rerun on this machine sees the trial's process died
        raw = self._suggest(trial)
        plan = self.planner.repair(raw, self.config.budget_bytes)
        source = trial.user_attrs.get("source", "nsga2")
        trial.set_user_attr("repaired", plan_key(plan) != plan_key(raw))
        return self._evaluate(trial, plan, self.config.cheap, source, self.study)

    # ---------------------------------------------------------------- stages

    def warm_start_plans(self) -> list[tuple[Plan, str]]:
        plans, budget = [], self.config.budget_bytes
        for b in self.config.bits:  # uniform plans at the default rank that fit
            rank = DEFAULT_RANK if DEFAULT_RANK in self.config.ranks else self.config.ranks[-1]
            uniform = self.planner.plan([LayerChoice(b, rank)] * self.L)
            if self.planner.memory(uniform) <= budget:
                plans.append((uniform, f"uniform-{b}bit"))
        floor = self.planner.memory(self.planner.plan([LayerChoice(self.config.bits[0], self.config.ranks[0])] * self.L))
        n = self.config.warm_start
        for i in range(n):
            fraction = 1.0 if n == 1 else 0.7 + 0.3 * i / (n - 1)
            plans.append((self.planner.fill(floor + int(fraction * (budget - floor))), f"prior-{fraction:.2f}"))
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
            for plan, source in self.warm_start_plans()[: self.config.trials]:
                self.study.enqueue_trial(self.params(plan), user_attrs={"source": source})
        self._fail_dead_trials()
        done = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        remaining = self.config.trials - done
        if remaining <= 0:
            return
        bar = _progress(self.config.trials, done, "search: explore", self.progress)
        try:
            self.study.optimize(self.objective, n_trials=None, gc_after_trial=False,
                                callbacks=[optuna.study.MaxTrialsCallback(self.config.trials, states=(TrialState.COMPLETE,)),
                                           lambda study, trial: bar.update(1, self._best(study))])
        finally:
            bar.close()

    def _fail_dead_trials(self) -> None:
        """Fail exploration trials left RUNNING by a process that died, so the storage's retry callback
        re-enqueues their plans. A trial can be a live worker's (on this machine or another), so it is failed
        only when its process is known dead: on this machine at once (its pid is gone), elsewhere once its
        heartbeat is older than the grace period (Optuna's fail_stale_trials, which optimize() also runs)."""
        import optuna
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _dead_here(t.user_attrs.get("worker", "")) and _fail(self.storage, t._trial_id) and retry:
                retry(self.study, self.storage.get_trial(t._trial_id))

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
                _fail(self.storage, t._trial_id)  # WAITING: the retry callback's copy of a stale lease
        holder = {"worker": _whoami(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        lease = self.storage.create_new_trial(leases._study_id,
                                              template_trial=create_trial(state=TrialState.RUNNING, user_attrs=holder))
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(self.storage, lease, stop), daemon=True)
        beat.start()
        started = time.perf_counter()
        try:
            # Two searches may have created leases at once: the earliest live one wins.
            first = min(leases.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), key=lambda t: t.number)
            if first._trial_id != lease:
                host, _, pid = first.user_attrs.get("worker", "?:?").rpartition(":")
                grace = self.storage.grace_period or 2 * (self.storage.get_heartbeat_interval() or 30)
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
                _fail(self.storage, t._trial_id)
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
        for l in range(self.L):  # the enqueued values
            trial.suggest_categorical(f"b{l}", list(self.config.bits))
            trial.suggest_categorical(f"r{l}", list(self.config.ranks))
        loss, memory = self._evaluate(trial, plan, fidelity, source, self.refine_study)
        self.refine_study.tell(trial, [loss, memory])
        return loss

    def promote(self) -> None:
        cheap = [p for p in self.points() if p.fidelity == "cheap"]
        front = sorted(pareto_front(cheap), key=lambda p: self.scalarize(p.loss, p.memory_bytes, cheap))
        # Always include uniform baselines that were evaluated, so the report can compare at full fidelity.
        chosen = front[: self.config.promote]
        chosen += [p for p in cheap if p.source.startswith("uniform-4") and p not in chosen]
        # The refinement's surrogate needs two full-fidelity points: where that leaves fewer (no uniform 4-bit
        # plan fits, or it is itself the promoted plan), promote more of the front rather than skip refinement.
        more = [p for p in front if p not in chosen]
        while self.config.refine and len(chosen) < 2 and more:
            chosen.append(more.pop(0))
        bar = _progress(len(chosen), 0, "search: promote", self.progress)
        for p in chosen:
            self._record(p.plan, self.config.full, "promotion" if not p.source.startswith("uniform") else p.source)
            bar.update(1)
        bar.close()

    def refine(self) -> None:
        from .gp import GaussianProcess, expected_improvement

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
                out.append(Evaluated(plan_from_key(t.user_attrs["plan_key"], self.config.group_size),
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
        return SearchResult(chosen, points, self.config.budget_bytes, self.fine_tune_steps(),
                            time.perf_counter() - start, self.run_config)


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


# ---------------------------------------------------------------------------------------- outputs


def write_outputs(result: SearchResult, out: Path, shapes: ModelShapes, backend: QuantBackend) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cheap, full = result.front("cheap"), result.front("full")
    on_front = {(plan_key(p.plan), p.fidelity) for p in cheap + full}
    atomic_write_json(out / "pareto.json", {
        "format": FORMAT,
        "budget_bytes": result.budget_bytes,
        "chosen": result.chosen.to_dict(),
        "points": [{**p.to_dict(), "on_front": (plan_key(p.plan), p.fidelity) in on_front} for p in result.points],
        "fine_tune_steps": result.fine_tune_steps,
        "seconds": result.seconds,
        "settings": {k: v for k, v in result.config.items() if k != "sensitivity"},
    })
    result.chosen.plan.save(out / "plan.json")
    atomic_write_text(out / "search-summary.txt", summary(result))
    try:
        plot_pareto(result, out / "pareto.png", shapes, backend)
    except Exception as e:  # never lose the search over a plot
        log.warning("search: could not draw pareto.png (%s)", e)


def summary(result: SearchResult) -> str:
    c = result.chosen
    on = " on the predicted training peak" if result.config.get("budget_on") == "training" else ""
    lines = [
        f"budget {format_bytes(result.budget_bytes)}{on}; {len(result.points)} evaluations "
        f"({sum(p.fidelity == 'cheap' for p in result.points)} cheap, {sum(p.fidelity == 'full' for p in result.points)} full), "
        f"{result.fine_tune_steps} fine-tune steps, {result.seconds:.0f} s",
        f"chosen plan: {c.plan.describe()}",
        f"  memory {format_bytes(c.memory_bytes)} ({c.avg_bits:.2f} avg bits incl. scales/zeros, adapters counted), "
        f"held-out loss {c.loss:.4f} ({c.fidelity} fidelity, from {c.source})",
    ]
    for p in result.points:
        if p.fidelity == "full" and p.source.startswith("uniform"):
            lines.append(f"  {p.source} at full fidelity: loss {p.loss:.4f}, memory {format_bytes(p.memory_bytes)}")
    return "\n".join(lines) + "\n"


def plot_pareto(result: SearchResult, path: Path, shapes: ModelShapes, backend: QuantBackend) -> Path:
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    mib = 2**20
    for fidelity, colour in (("cheap", "#9ecae1"), ("full", "#08519c")):
        pts = [p for p in result.points if p.fidelity == fidelity]
        if pts:
            ax.scatter([p.memory_bytes / mib for p in pts], [p.loss for p in pts], s=18, color=colour,
                       label=f"{fidelity} fidelity ({len(pts)})")
            front = pareto_front(pts)
            ax.step([p.memory_bytes / mib for p in front], [p.loss for p in front], where="post", color=colour, lw=1)
    ax.axvline(result.budget_bytes / mib, color="crimson", ls="--", lw=1, label="budget")
    training = result.config.get("budget_on") == "training"
    for b in backend.supported_bits:
        if b in result.config.get("bits", []):
            report = predict(shapes, Plan.uniform(shapes.num_layers, b, DEFAULT_RANK,
                                                  group_size=result.config["group_size"]), backend)
            m = report.total_bytes + (ADAPTER_STATE_BYTES * report.trainable_params
                                      + result.config.get("training_fixed_bytes", 0) if training else 0)
            ax.axvline(m / mib, color="grey", ls=":", lw=0.8)
            ax.text(m / mib, ax.get_ylim()[1], f" {b}-bit", fontsize=7, color="grey", va="top")
    ax.scatter([result.chosen.memory_bytes / mib], [result.chosen.loss], marker="*", s=160, color="orange",
               zorder=5, label="chosen")
    ax.set_xlabel("predicted training peak (MiB)" if training else "memory of quantized weights + adapters + rest (MiB)")
    ax.set_ylabel("held-out loss after fine-tune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------- entry points


def _load_or_profile(sensitivity: str | None, out: Path, model, tokenizer, data, progress: bool) -> Sensitivity:
    from .profile import RESULT_FILE, ProfileSettings, profile_model

    path = Path(sensitivity) if sensitivity else out / RESULT_FILE
    if path.is_file():
        from .architecture import decoder_layers

        prior = Sensitivity.load(path)
        prior.check_layers(len(decoder_layers(model)), source=str(path))
        return prior
    if sensitivity:
        raise SearchError(f"sensitivity file not found: {path}", "run `qradaptor profile` first or omit --sensitivity")
    log.info("search: no sensitivity profile in %s, profiling first", out)
    return profile_model(model, tokenizer, ProfileSettings(data=data), out=out, progress=progress)


def search(model: str | None = None, *, data: str | None = None, budget: str | int, out: str | Path,
           alpha: float = 0.5, trials: int = 24, storage: str | None = None, study: str | None = None,
           sensitivity: str | None = None, progress: bool = True, fitness: Fitness | None = None,
           **settings) -> SearchResult:
    """What ``qradaptor search`` does; returns the result and writes ``out/{pareto.json,plan.json,pareto.png}``."""
    from .models import load_model

    out = Path(out)
    _check_out(out)
    base, tokenizer = load_model(model)
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
        prior = _load_or_profile(sensitivity, out, base, tokenizer, data, progress)
        fitness = fitness or FineTuneFitness(base, tokenizer, data=data, config=config)
        runner = Search(model=base, sensitivity=prior, config=config, storage=storage_url, study_name=study,
                        fitness=fitness, run_config={"model": model, "data": data, "data_fingerprint": data_fp},
                        progress=progress)
        result = runner.run()
        write_outputs(result, out, shapes, runner.backend)
    return result


def _check_out(out: Path) -> None:
    """Refuse, before anything is written, an --out that is (or lies under) a file, or a non-empty directory
    the tool did not make: the search writes plan.json and more there and must not overwrite the user's files.
    The tool's are: a search's (marked by MARKER; or holding study.db, from before the marker existed) and a
    profile's (search continues in the directory `qradaptor profile` wrote, or profiles into its own)."""
    from .profile import HEATMAP_FILE, PARTIAL_FILE, RESULT_FILE

    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"lies under {p}, which is a file"
                raise SearchError(f"--out {out} {where}", "pass a directory for the search's outputs: a new one, "
                                  "or the --out of an earlier search to resume it")
            break
    if not out.is_dir() or (out / MARKER).is_file():
        return
    names = sorted(e.name for e in out.iterdir())
    ours = {RESULT_FILE, PARTIAL_FILE, HEATMAP_FILE} | (set(SEARCH_FILES) if "study.db" in names else set())
    foreign = [n for n in names if n not in ours and not n.startswith((".qradaptor", "study.db"))
               and not (n.startswith(".") and n.endswith(".tmp"))]  # our atomic writes' leftovers
    if foreign:
        raise SearchError(f"--out {out} is not empty and was not made by qradaptor (it holds "
                          f"{', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}); the search would "
                          "write plan.json and more there", "choose a new or empty --out directory")


@contextmanager
def _locked_out(out: Path, storage_url: str, study: str):
    """Make --out (marked as the tool's by MARKER) and hold an exclusive lock on MARKER while the search runs:
    a second search on the same --out is refused, naming the first; the lock goes with its process, so a
    crashed search never blocks the rerun that resumes it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / MARKER, "a+", encoding="utf-8")
    except OSError as e:
        raise SearchError(f"cannot write to --out {out}: {e.strerror or e}",
                          "pass a directory you can create and write to") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read())
            except ValueError:
                holder = {}
            raise SearchError(
                f"another search is running in {out} (process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')})",
                "wait for it to finish (stopping it and rerunning the same command resumes it), or add evaluators "
                f"to it with `qradaptor worker --storage {holder.get('storage', 'URL')} --study "
                f"{holder.get('study', 'NAME')}`") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "storage": redact(storage_url),
                            "study": study, "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def training_fixed_bytes(shapes: ModelShapes, backend: QuantBackend, model_config, config: SearchConfig) -> int:
    """The part of the predicted training peak that no plan's bits change: runtime, activations, loss (at the
    largest rank, so the bound holds for every plan), i.e. the peak minus the stored model and adapter state."""
    plan = Plan.uniform(shapes.num_layers, config.bits[-1], config.ranks[-1], group_size=config.group_size)
    peak = training_memory(shapes, plan, backend, model_config, batch_size=config.train_batch_size,
                           seq_len=config.seq_len, checkpointing=config.gradient_checkpointing)
    return peak.peak_bytes - peak.weights_bytes - peak.gradient_bytes - peak.optimizer_bytes


def _check_searchable(config: SearchConfig, shapes: ModelShapes, backend: QuantBackend) -> None:
    """Refuse a budget that no plan in the space meets, or one so large that there is nothing to choose."""
    planner = Planner(shapes, backend, None, config)
    floor = planner.memory(planner.plan([LayerChoice(config.bits[0], config.ranks[0])] * shapes.num_layers))
    what = "training-memory budget" if config.budget_on == "training" else "budget"
    if config.budget_bytes < floor:
        raise BudgetError(
            f"the {what} {format_bytes(config.budget_bytes)} is below the cheapest possible plan "
            f"(uniform {config.bits[0]}-bit, rank {config.ranks[0]}: {format_bytes(floor)} = {floor} bytes"
            + (f" predicted while training on {config.train_batch_size}×{config.seq_len}-token batches)"
               if config.budget_on == "training" else ")"),
            f"give a {what} of at least {format_bytes(floor)} ({floor} bytes)"
            + (", or train with a smaller batch" if config.budget_on == "training" else ""))
    ceiling = planner.memory(planner.plan([LayerChoice(16, config.ranks[-1])] * shapes.num_layers))
    if config.budget_bytes >= ceiling:
        suggestion = predict(shapes, Plan.uniform(shapes.num_layers, 4, DEFAULT_RANK), backend).total_bytes
        raise SearchError(
            f"the {what} {format_bytes(config.budget_bytes)} is at least the whole model unquantized with "
            f"rank-{config.ranks[-1]} adapters ({format_bytes(ceiling)}): there is nothing to search",
            f"give a smaller budget, e.g. 4bit ({suggestion} bytes), or fine-tune without quantization")


def worker(*, storage: str, study: str, progress: bool = True) -> int:
    """What ``qradaptor worker`` does: join a study's exploration and evaluate its trials until it has enough.
    Everything else (model, data, budget, space, prior) comes from the study."""
    import optuna

    from .models import load_model

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
    base, tokenizer = load_model(config_dict.get("model"))
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
