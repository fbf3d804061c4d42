"""The prior cost of plans, and the planner: memory of plans (memory.layer_bytes, memoised), repair into the
budget, greedy fill, one-edit neighbours, encodings, and the budget checks done before a search starts.

The prior's units: per-layer KL for bits (per linear where the profile estimated it, for finer genes); halving a
layer's rank is charged ``rank_value`` times that layer's KL at 4 bits (`config.default_rank_value`: a third with
zero-started adapters, DESIGN §6; more with the quantization-aware start, which recovers more of what bits lose), a
unit of it its share of that; another group size scales a linear's KL by `group_error_ratios`. Bits are charged
only their KL above the KL at ``recovered_bits`` (`config.default_recovered_bits`: 4 with the quantization-aware start,
what it is counted on recovering, benchmarks/results/rank_value-rb4.md; 8, all of it, from zero). It only orders
repair and warm-start moves; fitness is measured.
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
from .genes import Genes, Unit, Value, layers_from_key, plan_key


class PriorCost:
    """Prior sensitivity of a plan's choices, from the profile, for repair and warm start."""

    def __init__(self, sensitivity: Sensitivity, config: SearchConfig, *, shapes: ModelShapes | None = None,
                 group_ratios: list[dict[str, dict[int, float]]] | None = None):
        self.kl = sensitivity.kl
        self.module_kl = sensitivity.module_kl  # per linear, where the profile estimated it (--modules)
        self.config = config
        self.scale = [max(k.get(4, max(k.values())), 1e-9) for k in self.kl]  # a layer's importance
        # per layer, linear name → group size → its quantization error relative to the profile's group size
        self.shapes, self.group_ratios = shapes, group_ratios

    def bits_cost(self, layer: int, bits: int) -> float:
        """The layer's KL with all its linears at ``bits``, above what the fine-tune recovers (`_charged`)."""
        return self._charged(self.kl[layer], bits)

    def _charged(self, table: dict[int, float], bits: int, ratio: float = 1.0) -> float:
        """A KL table's KL at ``bits`` (times a group size's error ``ratio``) less its KL at the config's
        ``recovered_bits`` (none at 8, the default), which the fine-tune is counted on recovering from its start."""
        recovered = _interpolated(table, self.config.recovered_bits)
        return max(_interpolated(table, bits) * ratio - recovered, 0.0)

    def unit_bits_cost(self, unit: Unit, bits: int, group: int | None = None) -> float:
        """A unit's KL at ``bits`` (and ``group``: each linear's KL times its `group_error_ratios`) as `_charged`:
        its linears' estimates (`Sensitivity.module_kl`) summed where the profile has them all, else its layer's
        KL times its share of the layer's weights."""
        ratio = self._ratios(unit, group)
        rows = self.module_kl[unit.layer] if self.module_kl and not unit.whole_layer else {}
        if unit.names and all(name in rows for name in unit.names) and unit.weight_share > 0 and \
                len(unit.names) == len(unit.shapes):
            return sum(self._charged(rows[name], bits, ratio.get(name, 1.0)) for name in unit.names)
        return self._charged(self.kl[unit.layer], bits, ratio.get("", 1.0)) * unit.weight_share

    def _ratios(self, unit: Unit, group: int | None) -> dict[str, float]:
        """The unit's error ratio at ``group`` per short name, and over the unit ("": weighted by weights); a name
        missing has ratio 1 (none at the plans' own group size)."""
        if group is None or group == self.config.group_size or not self.group_ratios:
            return {}
        layer, ratios = self.shapes.layers[unit.layer], self.group_ratios[unit.layer]
        sums: dict[str, list[float]] = {}
        for i in unit.shapes:
            s = layer[i]
            r = ratios.get(s.name, {}).get(group, 1.0)
            for key in ("", s.name.rsplit(".", 1)[-1]):
                total = sums.setdefault(key, [0.0, 0.0])
                total[0], total[1] = total[0] + r * s.numel, total[1] + s.numel
        return {k: w / n if n else 1.0 for k, (w, n) in sums.items()}

    def rank_cost(self, layer: int, rank: int) -> float:
        top = max(self.config.ranks)
        return self.config.rank_value * self.scale[layer] * math.log2(top / rank)

    def unit_cost(self, unit: Unit, value: tuple[int, int, int]) -> float:
        """A unit's prior cost at ``value`` (bits, rank, group size): its KL, and its share of its layer's rank
        cost."""
        bits, rank, group = value
        return self.unit_bits_cost(unit, bits, group) + (self.rank_cost(unit.layer, rank) * unit.adapter_share
                                                         if unit.adapted else 0.0)


def group_error_ratios(model, group_sizes: tuple[int, ...], base: int) -> list[dict[str, dict[int, float]]]:
    """Per decoder layer, each linear's (by its name in the layer) expected quantization error at each of
    ``group_sizes`` relative to group size ``base``: the mean squared range of its weight's groups (row-major runs,
    as every backend groups). A quantizer's step is its group's range over 2^bits − 1, and its squared error
    scales with the step squared whatever the bits, so this ratio prices a group size without quantizing (HQQ's
    optimised zero moves every size alike). Sizes that do not divide a weight are left out."""
    import torch

    from ..architecture import decoder_layers, layer_linears

    def spread(weight: torch.Tensor, group: int) -> float:
        w = weight.detach().float().reshape(-1, group)
        return float(((w.amax(1) - w.amin(1)) ** 2).mean())

    out = []
    with torch.no_grad():
        for _, layer in decoder_layers(model):
            ratios = {}
            for name, linear in layer_linears(layer):
                n = linear.weight.numel()
                if n % base:
                    continue
                reference = max(spread(linear.weight, base), 1e-30)
                ratios[name] = {g: spread(linear.weight, g) / reference for g in group_sizes if n % g == 0}
            out.append(ratios)
    return out


def _interpolated(table: dict[int, float], bits: int) -> float:
    """A KL table (bits → KL) at ``bits``: 0 from 8 bits up; for an unprofiled bit-width, log-KL interpolated
    linearly in bits between the nearest profiled ones; beyond them, ~4x less KL per extra bit (3.3-4.5x:
    benchmarks/results/backends.md), 4x more per bit fewer."""
    if bits >= 8:
        return 0.0
    if bits in table:
        return table[bits]
    lo = max((b for b in table if b < bits), default=None)
    hi = min((b for b in table if b > bits), default=None)
    if hi is None:
        return table[lo] * 4.0 ** -(bits - lo)
    if lo is None:
        return table[hi] * 4.0 ** (hi - bits)
    t = (bits - lo) / (hi - lo)
    return math.exp((1 - t) * math.log(max(table[lo], 1e-12)) + t * math.log(max(table[hi], 1e-12)))


class Planner:
    """Memory and prior cost of plans, repair into a budget, greedy fill from the cheapest plan. Its moves change
    one unit of choice (`genes.Genes`: a layer, a block of one, or one linear) by one rung of bits or rank."""

    def __init__(self, shapes: ModelShapes, backend: QuantBackend, cost: PriorCost, config: SearchConfig):
        self.shapes, self.backend, self.cost, self.config = shapes, backend, cost, config
        self.genes = Genes(config.genes, shapes, target_modules=config.target_modules,
                           expert_adapters=config.expert_adapters, group_sizes=config.group_sizes,
                           group_size=config.group_size)
        self._layer_bytes: dict[tuple[int, LayerChoice], int] = {}
        self._unit_bytes: dict[tuple[int, Value], int] = {}
        self._unit_cost: dict[tuple[int, Value], float] = {}
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
            self._layer_bytes[key] = self._price(self.shapes.layers[layer], choice, self.template.target_modules)
        return self._layer_bytes[key]

    def unit_bytes(self, index: int, value: Value) -> int:
        """Unit ``index``'s linears at ``value`` (bits, rank, group size), memoised: a layer's bytes are its units'
        sum (each linear is priced alone: `memory.linear_bytes`)."""
        key = (index, value)
        if key not in self._unit_bytes:
            unit = self.genes.units[index]
            layer = self.shapes.layers[unit.layer]
            # the unit's own adapted linears by name: what the whole layer's targets adapt among them
            bits, rank, group = value
            self._unit_bytes[key] = self._price([layer[i] for i in unit.shapes],
                                                LayerChoice(bits, rank, group_size=group), unit.targets)
        return self._unit_bytes[key]

    def _price(self, shapes: list, choice: LayerChoice, target_modules: tuple[str, ...]) -> int:
        settings = dict(group_size=self.template.group_size, target_modules=target_modules)
        if self.config.budget_on == "gguf":
            from ..gguf_export import dense_type, exposes_codes, layer_gguf_bytes

            model, adapter = layer_gguf_bytes(shapes, choice, dense=dense_type(self.backend.metadata_bytes),
                                              has_codes=exposes_codes(self.backend.module_class), **settings)
            return model + adapter
        weights, params = layer_bytes(shapes, choice, self.backend, base_bytes=self.backend.metadata_bytes,
                                      dora=self.template.dora, expert_adapters=self.template.expert_adapters,
                                      **settings)
        return weights + params * self.param_bytes

    def memory(self, plan: Plan) -> int:
        return self.fixed_bytes + sum(self.layer_bytes(l, c) for l, c in enumerate(plan.layers))

    def values_memory(self, values: list[Value]) -> int:
        return self.fixed_bytes + sum(self.unit_bytes(i, v) for i, v in enumerate(values))

    def plan(self, choices: list[LayerChoice]) -> Plan:
        return Plan(list(choices), **self.config.plan_settings())

    def plan_of(self, values: list[Value]) -> Plan:
        return self.plan(self.genes.choices(values))

    def cheapest(self) -> list[Value]:
        """Every unit at the fewest bits, the smallest rank and its largest group size."""
        return [(self.config.bits[0], self.config.ranks[0], unit.groups[-1]) for unit in self.genes.units]

    def _moves(self, values: list[Value], direction: int):
        """One-rung moves of one unit's bits, rank or group size (down: -1, toward fewer bytes; up: +1), with their
        (Δcost, Δbytes). A smaller group costs bytes (one scale and zero more per group), so up is smaller."""
        bits, ranks = self.config.bits, self.config.ranks
        for i, (unit, (b, r, g)) in enumerate(zip(self.genes.units, values)):
            bi = bits.index(b)
            options = [(bits[bi + direction], r, g)] if 0 <= bi + direction < len(bits) else []
            if unit.adapted and 0 <= ranks.index(r) + direction < len(ranks):
                options.append((b, ranks[ranks.index(r) + direction], g))
            gi = unit.groups.index(g) - direction
            if len(unit.groups) > 1 and 0 <= gi < len(unit.groups):
                options.append((b, r, unit.groups[gi]))
            for new in options:
                yield i, new, self.unit_cost(i, new) - self.unit_cost(i, (b, r, g)), \
                    self.unit_bytes(i, new) - self.unit_bytes(i, (b, r, g))

    def unit_cost(self, index: int, value: Value) -> float:
        """`PriorCost.unit_cost` of unit ``index``, memoised (a fill of per-linear genes asks it ~10⁶ times)."""
        key = (index, value)
        if key not in self._unit_cost:
            self._unit_cost[key] = self.cost.unit_cost(self.genes.units[index], value)
        return self._unit_cost[key]

    def repair(self, plan: Plan, budget: int) -> Plan:
        """The plan as the genes write it (`Genes.values`), and, while over budget, the one-rung step down that
        costs least prior per byte saved."""
        values = self.genes.values(plan)
        memory = self.values_memory(values)
        while memory > budget:
            moves = [(dc / -db, i, n, db) for i, n, dc, db in self._moves(values, -1) if db < 0]
            if not moves:
                raise SearchError(f"no plan in the search space fits {format_bytes(budget)}",
                                  "raise the budget or allow fewer bits / smaller ranks")
            _, i, n, db = min(moves, key=lambda m: (m[0], m[1], m[2]))
            values[i] = n
            memory += db
        return self.plan_of(values)

    def fill(self, budget: int) -> Plan:
        """From the cheapest plan, take the one-rung step up that buys most prior per byte, while it fits."""
        values = self.cheapest()
        memory = self.values_memory(values)
        while True:
            # a step that costs no bytes (2 → 3 bits where both are written as the same GGUF type) comes first
            moves = [(-dc / db if db > 0 else math.inf, i, n, db) for i, n, dc, db in self._moves(values, +1)
                     if db >= 0 and memory + db <= budget and dc < 0]
            if not moves:
                return self.plan_of(values)
            _, i, n, db = max(moves, key=lambda m: (m[0], -m[1], -m[2][0], -m[2][1], m[2][2]))
            values[i] = n
            memory += db

    def neighbours(self, plan: Plan, budget: int) -> list[Plan]:
        """Plans one rung away in one unit's bits or rank, repaired into the budget."""
        out, seen = [], {plan_key(plan)}
        values = self.genes.values(plan)
        for direction in (-1, +1):
            for i, n, _, _ in self._moves(values, direction):
                changed = list(values)
                changed[i] = n
                candidate = self.repair(self.plan_of(changed), budget)
                if plan_key(candidate) not in seen:
                    seen.add(plan_key(candidate))
                    out.append(candidate)
        return out

    def encode(self, plan: Plan) -> np.ndarray:
        """The plan's gene values scaled to [0, 1] (the refinement's GP inputs; group sizes where they are genes)."""
        bits, ranks = self.config.bits, self.config.ranks
        out = []
        for unit, (b, r, g) in zip(self.genes.units, self.genes.values(plan)):
            out += [bits.index(b) / max(1, len(bits) - 1), ranks.index(r) / max(1, len(ranks) - 1)]
            if len(unit.groups) > 1:
                out.append(unit.groups.index(g) / (len(unit.groups) - 1))
        return np.array(out)


def plan_from_key(key: str, config: SearchConfig) -> Plan:
    """The plan a trial's ``plan_key`` names, with the search's settings."""
    return Plan(layers_from_key(key), **config.plan_settings())


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
    floor = planner.values_memory(planner.cheapest())
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
