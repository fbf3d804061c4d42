"""The prior cost of plans, and the planner: memory of plans (memory.layer_bytes, memoised), repair into the
budget, greedy fill, one-edit neighbours, encodings, and the budget checks done before a search starts.

The prior's units: per-layer KL for bits; halving a layer's rank is charged ``rank_value`` times that
layer's KL at 4 bits (on SmolLM2, halving every rank cost about a third of what 4-bit quantization costs
in held-out loss; see DESIGN §6). It only orders repair and warm-start moves; fitness is measured.
"""

from __future__ import annotations

import math

import numpy as np

from ..backends import QuantBackend
from ..errors import BudgetError
from ..memory import ADAPTER_STATE_BYTES, ModelShapes, format_bytes, layer_bytes, predict, training_memory
from ..plan import DEFAULT_RANK, LayerChoice, Plan
from ..profile import Sensitivity
from .config import SearchConfig, SearchError


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
        # Unprofiled bit-width: interpolate log-KL linearly in bits between the nearest profiled ones; beyond them,
        # ~4x less KL per extra bit (3.3-4.5x: benchmarks/results/backends.md), 4x more per bit fewer.
        lo = max((b for b in table if b < bits), default=None)
        hi = min((b for b in table if b > bits), default=None)
        if hi is None:
            return table[lo] * 4.0 ** -(bits - lo)
        if lo is None:
            return table[hi] * 4.0 ** (hi - bits)
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
        self._layer_bytes: dict[tuple[int, LayerChoice], int] = {}
        # every plan the planner makes has these settings (target modules, group size): price them as predict does
        self.template = config_plan(config, shapes.num_layers, config.bits[0], config.ranks[0])
        report = predict(shapes, self.template, backend)
        self.fixed_bytes = (config.gguf_fixed_bytes if config.budget_on == "gguf"
                            else report.other_bytes + config.training_fixed_bytes)
        # bytes per trainable parameter: the adapter (fp32, as predict prices it), plus its gradient and AdamW's
        # moments when the budget is on the training peak
        self.param_bytes = 4 + (ADAPTER_STATE_BYTES if config.budget_on == "training" else 0)

    def layer_bytes(self, layer: int, choice: LayerChoice) -> int:
        """`memory.layer_bytes` (or, for a ``gguf:`` budget, `gguf_export.layer_gguf_bytes`), memoised (the search
        prices the same layer choices thousands of times)."""
        key = (layer, choice)
        if key not in self._layer_bytes:
            settings = dict(group_size=self.template.group_size, target_modules=self.template.target_modules)
            if self.config.budget_on == "gguf":
                from ..gguf_export import exposes_codes, dense_type, layer_gguf_bytes

                model, adapter = layer_gguf_bytes(self.shapes.layers[layer], choice,
                                                  dense=dense_type(self.backend.metadata_bytes),
                                                  has_codes=exposes_codes(self.backend.module_class), **settings)
                self._layer_bytes[key] = model + adapter
            else:
                weights, params = layer_bytes(self.shapes.layers[layer], choice, self.backend,
                                              base_bytes=self.backend.metadata_bytes, dora=self.template.dora,
                                              expert_adapters=self.template.expert_adapters, **settings)
                self._layer_bytes[key] = weights + params * self.param_bytes
        return self._layer_bytes[key]

    def memory(self, plan: Plan) -> int:
        return self.fixed_bytes + sum(self.layer_bytes(l, c) for l, c in enumerate(plan.layers))

    def plan(self, choices: list[LayerChoice]) -> Plan:
        return Plan(list(choices), **self.config.plan_settings())

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
            # a step that costs no bytes (2 → 3 bits where both are written as the same GGUF type) comes first
            moves = [(-dc / db if db > 0 else math.inf, l, n, db) for l, n, dc, db in self._moves(choices, +1)
                     if db >= 0 and memory + db <= budget and dc < 0]
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


def plan_from_key(key: str, config: SearchConfig) -> Plan:
    """The plan a trial's ``plan_key`` names, with the search's settings."""
    return Plan([LayerChoice(*map(int, item.split("/"))) for item in key.split(",")], **config.plan_settings())


def config_plan(config: SearchConfig, num_layers: int, bits: int, rank: int) -> Plan:
    """The uniform plan at ``bits`` and ``rank`` with the search's settings (group size, target modules, DoRA)."""
    return Plan.uniform(num_layers, bits, rank, **config.plan_settings())


def training_fixed_bytes(shapes: ModelShapes, backend: QuantBackend, model_config, config: SearchConfig) -> int:
    """The part of the predicted training peak that no plan's bits change: runtime, activations, loss (at the
    largest rank, so the bound holds for every plan), i.e. the peak minus the stored model and adapter state."""
    plan = config_plan(config, shapes.num_layers, config.bits[-1], config.ranks[-1])
    peak = training_memory(shapes, plan, backend, model_config, batch_size=config.train_batch_size,
                           seq_len=config.seq_len, checkpointing=config.gradient_checkpointing)
    return peak.peak_bytes - peak.weights_bytes - peak.gradient_bytes - peak.optimizer_bytes


def check_searchable(config: SearchConfig, shapes: ModelShapes, backend: QuantBackend) -> None:
    """Refuse a budget that no plan in the space meets, or one so large that there is nothing to choose."""
    planner = Planner(shapes, backend, None, config)
    floor = planner.memory(planner.plan([LayerChoice(config.bits[0], config.ranks[0])] * shapes.num_layers))
    what = {"training": "training-memory budget", "gguf": "GGUF budget"}.get(config.budget_on, "budget")
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
        suggestion = predict(shapes, config_plan(config, shapes.num_layers, 4, DEFAULT_RANK), backend).total_bytes
        raise SearchError(
            f"the {what} {format_bytes(config.budget_bytes)} is at least the whole model unquantized with "
            f"rank-{config.ranks[-1]} adapters ({format_bytes(ceiling)}): there is nothing to search",
            f"give a smaller budget, e.g. 4bit ({suggestion} bytes), or fine-tune without quantization")
