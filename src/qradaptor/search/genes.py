"""The search's genes: how a plan is written as Optuna parameters, one bits gene and one rank gene per unit of
choice. ``SearchConfig.genes`` picks the units:

    layer    each decoder layer (all its linears at the layer's bits and rank)   params b3, r3
    groups   each block of a layer: the linears under one child of it (self_attn, mlp)   params b3.self_attn, r3.mlp
    module   each linear of a layer, by short name                                params b3.k_proj, r3.down_proj

With ``SearchConfig.group_sizes``, each unit also has a group-size gene (``g3``, ``g3.mlp``) among the sizes that
divide the rows of all its linears (a group then never straddles two rows, which GGUF's block types need) and the
plan's own size (which every linear keeps without group genes); a unit with no other such size keeps the plan's.

A unit whose linears get no adapter has no rank gene (it keeps its layer's rank). In each layer one unit's choice
is the layer's own (`LayerChoice.bits`, ``rank``) and the others' are `ModuleChoice` entries: the unit holding
routed experts (which always take their layer's choice; in the ``module`` layout they form a unit of their own),
else the adapted unit with the most weights. The layer's rank is its own unit's rank gene, or, where that unit has
none (routed experts without adapters), the first adapted unit's. Plans made by per-layer genes carry no modules, so a ``layer`` search's
studies, keys and plans are what they were before genes had layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import ModelShapes, adapted_shapes
from ..plan import DEFAULT_RANK, LayerChoice, ModuleChoice, Plan

GENE_LAYOUTS = ("layer", "groups", "module")

#: (bits, rank, group size) of one unit
Value = tuple[int, int, int]


@dataclass(frozen=True)
class Unit:
    """One unit of choice: a set of linears of layer ``layer`` that share bits and rank."""

    layer: int
    label: str  # "" for a whole layer; else the block (self_attn) or the linear's short name (k_proj), or "experts"
    names: tuple[str, ...]  # short names of its linears that are not routed experts (what its ModuleChoices name)
    shapes: tuple[int, ...]  # its linears: indices into ModelShapes.layers[layer]
    targets: tuple[str, ...]  # short names of its linears that get adapters (routed experts aside)
    adapted: bool  # some of its linears get adapters: it has a rank gene
    primary: bool  # its choice is the layer's own (LayerChoice.bits, .rank)
    weight_share: float  # its share of the layer's quantizable weights
    adapter_share: float  # its share of the layer's adapter parameters at one rank (0 when not adapted)
    groups: tuple[int, ...] = (64,)  # the group sizes it may take, ascending (a gene when there are two or more)

    @property
    def whole_layer(self) -> bool:
        return self.label == ""

    def param(self, kind: str) -> str:
        """The Optuna parameter of its bits (``kind`` "b"), rank ("r") or group-size ("g") gene."""
        return f"{kind}{self.layer}" + (f".{self.label}" if self.label else "")


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_units(layer: int, shapes: list, layout: str, *, target_modules: tuple[str, ...],
                expert_adapters: bool = False, group_sizes: tuple[int, ...] = (), group_size: int = 64) -> list[Unit]:
    """The units of one decoder layer (its linears' shapes) under ``layout``, each with the ``group_sizes`` that
    divide its linears' rows, and the plan's ``group_size``."""
    if layout not in GENE_LAYOUTS:
        raise ValueError(f"unknown gene layout {layout!r}")
    adapted = {s.name for s in adapted_shapes(shapes, target_modules, expert_adapters)}
    groups: dict[str, list[int]] = {}
    where: dict[str, str] = {}  # short name → its unit (linears of one short name always share a choice)
    for i, s in enumerate(shapes):
        if layout == "layer":
            label = ""
        elif s.expert:
            label = s.name.split(".")[0] if layout == "groups" else "experts"
        else:
            label = where.setdefault(_short(s.name), s.name.split(".")[0] if layout == "groups" else _short(s.name))
        groups.setdefault(label, []).append(i)
    total = sum(s.numel for s in shapes) or 1
    per_rank = sum(s.in_features + s.out_features for s in shapes if s.name in adapted) or 1
    numel = {label: sum(shapes[i].numel for i in members) for label, members in groups.items()}
    with_experts = [label for label, members in groups.items() if any(shapes[i].expert for i in members)]
    adapted_groups = [label for label, members in groups.items() if any(shapes[i].name in adapted for i in members)]
    primary = with_experts[0] if with_experts else max(adapted_groups or groups, key=lambda label: numel[label])
    units = []
    for label, members in groups.items():
        names = tuple(dict.fromkeys(_short(shapes[i].name) for i in members if not shapes[i].expert))
        adapted_here = [shapes[i] for i in members if shapes[i].name in adapted]
        targets = tuple(dict.fromkeys(_short(s.name) for s in adapted_here if not s.expert))
        # the plan's own size stays open to every unit (as without group genes), row-aligned or not
        sizes = {g for g in group_sizes if all(shapes[i].in_features % g == 0 for i in members)} | {group_size}
        units.append(Unit(layer, label, names, tuple(members), targets, bool(adapted_here), label == primary,
                          numel[label] / total, sum(s.in_features + s.out_features for s in adapted_here) / per_rank,
                          tuple(sorted(sizes))))
    return units


class Genes:
    """A search's units of choice over a model (`layer_units` of every decoder layer), and the translation between
    plans, gene values (one ``(bits, rank, group size)`` per unit, in order) and Optuna parameters."""

    def __init__(self, layout: str, shapes: ModelShapes, *, target_modules: tuple[str, ...],
                 expert_adapters: bool = False, group_sizes: tuple[int, ...] = (), group_size: int = 64):
        self.layout, self.group_size = layout, group_size
        self.units = [u for l, layer in enumerate(shapes.layers)
                      for u in layer_units(l, layer, layout, target_modules=target_modules,
                                           expert_adapters=expert_adapters, group_sizes=group_sizes,
                                           group_size=group_size)]
        self.num_layers = shapes.num_layers
        self._primary = {u.layer: i for i, u in enumerate(self.units) if u.primary}
        # the unit whose rank gene is the layer's rank (`LayerChoice.rank`)
        self._rank_of = {}
        for i, u in enumerate(self.units):
            if u.adapted and (u.primary or u.layer not in self._rank_of):
                self._rank_of[u.layer] = i

    def space(self, bits: tuple[int, ...], ranks: tuple[int, ...]) -> dict:
        """The Optuna parameters (name → distribution), in the order `params` writes them."""
        from optuna.distributions import CategoricalDistribution

        b, r = CategoricalDistribution(list(bits)), CategoricalDistribution(list(ranks))
        out = {}
        for u in self.units:
            out[u.param("b")] = b
            if u.adapted:
                out[u.param("r")] = r
            if len(u.groups) > 1:
                out[u.param("g")] = CategoricalDistribution(list(u.groups))
        return out

    def values(self, plan: Plan) -> list[Value]:
        """The plan's gene values: each unit's bits, rank and group size (a unit's linears differing in the plan
        take its first linear's; an unadapted unit's rank is its layer's; a group size the unit cannot take is the
        search's)."""
        out = []
        for u in self.units:
            layer = plan.layers[u.layer]
            own = layer if u.primary or not u.names else layer.of(u.names[0])
            group = own.group_size or plan.group_size
            if group not in u.groups:
                group = self.group_size
            out.append((own.bits, own.rank if u.adapted else layer.rank, group))
        return out

    def choices(self, values: list[Value]) -> list[LayerChoice]:
        """The plan's layers for gene values (`values`' inverse)."""
        layers = []
        for l in range(self.num_layers):
            bits, _, group = values[self._primary[l]]
            rank = self._layer_rank(l, values)
            # group sizes as plans write them: None where it is the layer's, and the layer's where it is the plan's
            modules = [ModuleChoice(name, v[0], v[1] if u.adapted else rank, None if v[2] == group else v[2])
                       for u, v in zip(self.units, values) if u.layer == l and not u.primary for name in u.names]
            layers.append(LayerChoice(bits, rank, tuple(modules), None if group == self.group_size else group)
                          .with_group_size(self.group_size))
        return layers

    def params(self, values: list[Value]) -> dict:
        """Optuna parameters for gene values."""
        out = {}
        for u, (bits, rank, group) in zip(self.units, values):
            out[u.param("b")] = bits
            if u.adapted:
                out[u.param("r")] = rank
            if len(u.groups) > 1:
                out[u.param("g")] = group
        return out

    def values_of(self, params: dict) -> list[Value]:
        """Gene values from Optuna parameters (`params`' inverse); an unadapted unit takes its layer's rank."""
        values = [(params[u.param("b")], params[u.param("r")] if u.adapted else None,
                   params[u.param("g")] if len(u.groups) > 1 else u.groups[0]) for u in self.units]
        return [(b, r if r is not None else self._layer_rank(u.layer, values), g)
                for u, (b, r, g) in zip(self.units, values)]

    def _layer_rank(self, layer: int, values: list) -> int:
        source = self._rank_of.get(layer)
        return values[source][1] if source is not None else DEFAULT_RANK  # a layer nothing of which is adapted


def plan_key(plan: Plan) -> str:
    """A plan's layers as a string (what a study records per trial): ``bits/rank`` per layer (``4/16g32`` where it
    gives its own group size), comma-separated, each followed by its modules' own as ``+name:bits/rank`` (likewise).
    """
    def choice(c) -> str:
        return f"{c.bits}/{c.rank}" + (f"g{c.group_size}" if c.group_size else "")

    return ",".join(choice(c) + "".join(f"+{m.name}:{choice(m)}" for m in c.modules) for c in plan.layers)


def _value(text: str) -> tuple[int, int, int | None]:
    bits, rest = text.split("/")
    rank, _, group = rest.partition("g")
    return int(bits), int(rank), int(group) if group else None


def layers_from_key(key: str) -> list[LayerChoice]:
    """`plan_key`'s inverse."""
    layers = []
    for item in key.split(","):
        own, *modules = item.split("+")
        bits, rank, group = _value(own)
        layers.append(LayerChoice(bits, rank, tuple(
            ModuleChoice(name, *_value(value)) for name, value in (m.split(":") for m in modules)), group_size=group))
    return layers
