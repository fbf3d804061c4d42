"""The plan: one ``(bits, rank)`` per decoder layer plus the settings every layer shares.

On disk a plan is a JSON or YAML object whose ``layers`` is a list with one ``{"bits": b, "rank": r}``
per decoder layer, in order. Every other key is optional (defaults below), so a plan can be written by
hand::

    {"layers": [{"bits": 4, "rank": 16}, {"bits": 8, "rank": 8}, ...]}

Bits are the stored bit-width of every quantized linear in that layer; ``16`` keeps the layer's linears
unquantized (at the base dtype). A layer may give some of its linears their own bits or rank (`ModuleChoice`),
named as ``target_modules`` names them; what a module does not name is the layer's::

    {"bits": 4, "rank": 16, "modules": {"k_proj": {"bits": 8}, "down_proj": {"bits": 3, "rank": 32}}}

A layer or a module may also give its own ``group_size`` (weights per quantization group; what it leaves out is
its layer's, and a layer's is the plan's)::

    {"bits": 4, "rank": 16, "group_size": 128, "modules": {"k_proj": {"group_size": 32}}}

Applying a plan to a model (``qradaptor.quantize``) gives the quantized base; ``lora_config`` gives the PEFT
``LoraConfig`` whose per-module ranks follow the plan.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from .architecture import (DEFAULT_TARGET_MODULES, decoder_layers, expert_holders, linear_names, model_expert_holders,
                           resolve_targets)
from .errors import PlanError
from .io import atomic_write_text, read_text

#: Every bit-width a plan may name (every width 2..8, and 16). Whether a backend can store it is the
#: backend's business (``hqq`` and ``reference`` store 2..8, ``hqq-native`` 2, 3, 4, 8).
KNOWN_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
#: The bit-widths a search tries by default (DESIGN §3); 7 can be stored but is not on the default ladder.
DEFAULT_BIT_LADDER = (2, 3, 4, 5, 6, 8)
#: 16 means "leave this layer unquantized".
UNQUANTIZED_BITS = 16
DEFAULT_RANK = 16
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class ModuleChoice:
    """The bits and rank of one linear of a decoder layer, where they differ from its layer's (`LayerChoice`).
    ``name``: the linear's short name, as ``target_modules`` spells it (``k_proj``); routed experts always take
    their layer's choice."""

    name: str
    bits: int
    rank: int
    group_size: int | None = None  # None: its layer's


@dataclass(frozen=True)
class LayerChoice:
    """One decoder layer's bits, rank and (``None``: the plan's) group size, and ``modules``: its linears whose own
    differ (sorted by name, none equal to the layer's, so that equal choices compare and hash equal: the search
    memoises on them)."""

    bits: int
    rank: int
    modules: tuple[ModuleChoice, ...] = ()
    group_size: int | None = None

    def __post_init__(self) -> None:
        modules = [m if isinstance(m, ModuleChoice) else ModuleChoice(*m) for m in self.modules]
        names = [m.name for m in modules]
        if len(set(names)) != len(names):
            raise PlanError(f"a layer names module {sorted(n for n in names if names.count(n) > 1)[0]!r} twice",
                            "give each module of a layer at most one entry")
        # a module's group size equal to its layer's is its layer's (None)
        modules = [ModuleChoice(m.name, m.bits, m.rank, None if m.group_size == self.group_size else m.group_size)
                   for m in modules]
        object.__setattr__(self, "modules", tuple(sorted(
            (m for m in modules if (m.bits, m.rank, m.group_size) != (self.bits, self.rank, None)),
            key=lambda m: m.name)))

    def of(self, name: str) -> "LayerChoice":
        """The bits, rank and group size of the layer's linear ``name`` (its name in the layer or its short name):
        its own `ModuleChoice`, or the layer's."""
        short = name.rsplit(".", 1)[-1]
        for m in self.modules:
            if m.name == short:
                return LayerChoice(m.bits, m.rank, group_size=m.group_size or self.group_size)
        return LayerChoice(self.bits, self.rank, group_size=self.group_size) if self.modules else self

    def with_group_size(self, default: int) -> "LayerChoice":
        """The same choice with the group sizes that are implied left implicit (None): the layer's where it is the
        plan's ``default``, a module's where it is its layer's."""
        if self.group_size is None and all(m.group_size is None for m in self.modules):
            return self  # nothing given: the usual case, and the search builds thousands of plans
        layer = self.group_size or default
        modules = tuple(ModuleChoice(m.name, m.bits, m.rank, None if (m.group_size or layer) == layer else m.group_size)
                        for m in self.modules)
        normal = LayerChoice(self.bits, self.rank, modules, None if layer == default else layer)
        return self if normal == self else normal

    @property
    def bit_widths(self) -> tuple[int, ...]:
        """Every bit-width the layer's linears are stored at, sorted."""
        return tuple(sorted({self.bits, *(m.bits for m in self.modules)}))

    @property
    def max_rank(self) -> int:
        return max([self.rank, *(m.rank for m in self.modules)])

    def unquantized(self) -> "LayerChoice":
        """The same ranks, every linear at 16 bits (no groups)."""
        return LayerChoice(UNQUANTIZED_BITS, self.rank,
                           tuple(ModuleChoice(m.name, UNQUANTIZED_BITS, m.rank) for m in self.modules))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bits": self.bits, "rank": self.rank}
        if self.group_size is not None:  # written only when given: a plan's file and digest stay as before
            d["group_size"] = self.group_size
        if self.modules:  # written only when some module differs: a per-layer plan's file and digest stay as before
            d["modules"] = {m.name: {k: v for k, v in (("bits", m.bits), ("rank", m.rank), ("group_size", m.group_size))
                                     if v is not None and v != d.get(k)} for m in self.modules}
        return d


@dataclass
class Plan:
    """Per-layer bits and ranks (and per-module ones where a layer gives them) and the shared settings.

    - ``group_size``: weights per quantization group (one scale and one zero each).
    - ``alpha_ratio``: LoRA alpha = ``alpha_ratio * rank`` for every module (keeps the update scale fixed
      across ranks).
    - ``target_modules``: the linears inside each decoder layer that get a LoRA adapter; every linear
      inside a decoder layer is quantized at the layer's bits (or its own, `ModuleChoice`). Embeddings, norms and
      ``lm_head`` are never quantized.
    - ``dropout``: LoRA dropout.
    - ``dora``: DoRA adapters (PEFT's ``use_dora``): each adapted module also trains a magnitude per output row,
      ``out_features`` more parameters (QDoRA on a quantized base).
    - ``expert_adapters``: routed experts (MoE) get adapters too, one per expert and projection at the layer's
      rank (their layer's ``target_modules`` do not apply to them). Off by default: an expert's adapter trains on
      the ~k/E of the tokens routed to it and costs E× the parameters of one projection's adapter.
    """

    layers: list[LayerChoice]
    group_size: int = DEFAULT_GROUP_SIZE
    alpha_ratio: float = 2.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    dropout: float = 0.0
    dora: bool = False
    expert_adapters: bool = False

    def __post_init__(self) -> None:
        self.layers = [c if isinstance(c, LayerChoice) else _parse_layer(i, c) for i, c in enumerate(self.layers)]
        self.target_modules = tuple(self.target_modules)
        self.check()
        # the plan's own group size, where a layer or module gives it, is the default (None): equal plans compare equal
        self.layers = [c.with_group_size(self.group_size) for c in self.layers]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, num_layers: int, bits: int, rank: int = DEFAULT_RANK, **settings: Any) -> "Plan":
        return cls([LayerChoice(bits, rank) for _ in range(num_layers)], **settings)

    @classmethod
    def from_dict(cls, obj: Any, *, source: str = "plan") -> "Plan":
        if not isinstance(obj, dict) or "layers" not in obj:
            raise PlanError(
                f"{source}: a plan must be an object with a 'layers' list",
                'write it as {"layers": [{"bits": 4, "rank": 16}, ...]} with one entry per decoder layer',
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise PlanError(f"{source}: unknown plan keys {unknown}", f"allowed keys: {sorted(known)}")
        layers = obj["layers"]
        if not isinstance(layers, list) or not layers:
            raise PlanError(f"{source}: 'layers' must be a non-empty list", "give one {bits, rank} per decoder layer")
        settings = {k: v for k, v in obj.items() if k != "layers"}
        try:
            parsed = [_parse_layer(i, entry) for i, entry in enumerate(layers)]
            return cls(parsed, **settings)
        except PlanError as e:
            raise PlanError(f"{source}: {e.cause}", e.fix) from None
        except (TypeError, ValueError) as e:
            raise PlanError(f"{source}: invalid setting ({e})", "see the Plan documentation for the allowed keys") from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}", "pass the path of a plan .json or .yaml file")
        text = read_text(path, PlanError, "plan file")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                obj = yaml.safe_load(text)
            else:
                obj = json.loads(text)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            raise PlanError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({e})",
                            "fix the syntax or regenerate the plan") from None
        return cls.from_dict(obj, source=str(path))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [c.to_dict() for c in self.layers]
        d["target_modules"] = list(self.target_modules)
        for key in ("dora", "expert_adapters"):  # written only when on: a plan's file and digest stay as before
            if not d[key]:
                del d[key]
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        return atomic_write_text(path, text)

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Checks that need no model: known bit-widths, positive ranks, sane settings."""
        for i, c in enumerate(self.layers):
            for where, own in ((f"layer {i}", c), *((f"layer {i}'s {m.name}", m) for m in c.modules)):
                if type(own.bits) is not int or type(own.rank) is not int:
                    raise PlanError(f"{where} has non-integer bits or rank ({own.bits!r}, {own.rank!r})",
                                    "use integers")
                if own.bits not in KNOWN_BITS:
                    raise PlanError(
                        f"{where} asks for {own.bits}-bit weights, which is not a known bit-width",
                        f"use one of {list(KNOWN_BITS)} (16 = unquantized)",
                    )
                if own.rank <= 0:
                    raise PlanError(f"{where} has rank {own.rank}; ranks must be positive",
                                    "use a rank such as 8 or 16")
                if own.group_size is not None and (type(own.group_size) is not int or own.group_size <= 0):
                    raise PlanError(f"{where} has group size {own.group_size!r}; group sizes must be positive "
                                    "integers", "use e.g. 32, 64 or 128 (or leave it out: the plan's)")
        # bool is an int to Python, and JSON allows Infinity/NaN: neither is a sane setting
        if type(self.group_size) is not int or self.group_size <= 0:
            raise PlanError(f"group_size must be a positive integer, got {self.group_size!r}", "the default is 64")
        if isinstance(self.alpha_ratio, bool) or not isinstance(self.alpha_ratio, (int, float)) \
                or not 0 < self.alpha_ratio < math.inf:
            raise PlanError(f"alpha_ratio must be a positive finite number, got {self.alpha_ratio!r}", "the default is 2.0")
        if not self.target_modules:
            raise PlanError("target_modules is empty", f"the default is {list(DEFAULT_TARGET_MODULES)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise PlanError(f"dropout must be in [0, 1), got {self.dropout!r}", "the default is 0.0")
        if not isinstance(self.dora, bool):
            raise PlanError(f"dora must be true or false, got {self.dora!r}", "the default is false (plain LoRA)")
        if not isinstance(self.expert_adapters, bool):
            raise PlanError(f"expert_adapters must be true or false, got {self.expert_adapters!r}",
                            "the default is false (routed experts get no adapters)")
        if self.expert_adapters and self.dora:
            raise PlanError("DoRA adapters on routed experts are not supported: PEFT adapts 3-D expert tensors with "
                            "LoRA only, so the export's adapter could not hold them",
                            "drop dora (--no-dora) or expert_adapters (--no-expert-adapters)")

    def check_model(self, model, *, source: str = "plan") -> None:
        """Checks against a model: one entry per decoder layer, target modules present."""
        n = len(decoder_layers(model))
        if len(self.layers) != n:
            raise PlanError(
                f"{source} has {len(self.layers)} layers but the model has {n} decoder layers",
                "make a plan for this model (one {bits, rank} per decoder layer)",
            )
        if self.expert_adapters and not model_expert_holders(model):
            raise PlanError(f"{source} gives routed experts adapters (expert_adapters), but this model has no routed "
                            "experts that qradaptor splits into linears",
                            "drop --expert-adapters (expert_adapters in a plan file) for this model")
        linears = linear_names(decoder_layers(model)[0][1])
        targets = self.targets_in(linears)
        missing = [t for t in targets if t not in linears]
        if missing:
            raise PlanError(
                f"{source}: target modules {missing} are not linear modules of this model's decoder layers",
                f"choose target modules among {list(linears)} (--target-modules on the command line, "
                "target_modules in a plan file), or leave them out: every linear of the layer",
            )
        for i, c in enumerate(self.layers):
            for m in c.modules:
                if m.name not in linears:
                    raise PlanError(f"{source}: layer {i} gives module {m.name!r} its own bits or rank, but the "
                                    "model's decoder layers have no linear so named",
                                    f"name one of {list(linears)} in a layer's 'modules'")
                if m.rank != c.rank and m.name not in targets:
                    raise PlanError(f"{source}: layer {i} gives {m.name} rank {m.rank}, but {m.name} gets no "
                                    f"adapter (target modules: {list(targets)})",
                                    f"drop its rank, or add {m.name} to target_modules")

    @staticmethod
    def check_settings(model, settings: dict) -> dict:
        """A search's or run's plan ``settings`` checked against ``model`` before any work (target modules that
        are its linears, expert adapters only where it has routed experts); ``target_modules`` as a list."""
        settings = dict(settings)
        if "target_modules" in settings:
            settings["target_modules"] = list(Plan.check_targets(model, settings["target_modules"]))
        if settings.get("expert_adapters"):
            Plan.uniform(len(decoder_layers(model)), 4, expert_adapters=True).check_model(
                model, source="--expert-adapters")
        return settings

    @staticmethod
    def check_targets(model, target_modules: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """``target_modules`` as a tuple, refused (before any work) unless every one is a linear module of the
        model's decoder layers."""
        targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
        Plan.uniform(len(decoder_layers(model)), 4, target_modules=targets).check_model(model, source="--target-modules")
        return targets

    def group_size_of(self, layer: int, name: str) -> int:
        """The group size linear ``name`` of layer ``layer`` is quantized with: its own, its layer's, or the plan's."""
        return self.layers[layer].of(name).group_size or self.group_size

    def targets_in(self, linears: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """The modules this plan adapts in a layer whose linears are named ``linears`` (`resolve_targets`)."""
        return resolve_targets(self.target_modules, linears)

    # ------------------------------------------------------------------ derived views
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def bits(self) -> list[int]:
        return [c.bits for c in self.layers]

    @property
    def ranks(self) -> list[int]:
        return [c.rank for c in self.layers]

    @property
    def max_rank(self) -> int:
        """The largest rank any module is given."""
        return max(c.max_rank for c in self.layers)

    @property
    def bit_widths(self) -> tuple[int, ...]:
        """Every bit-width some linear is stored at (16: unquantized), sorted."""
        return tuple(sorted({b for c in self.layers for b in c.bit_widths}))

    def describe(self) -> str:
        """A compact one-line summary, e.g. ``4b×28 8b×2 | r16×30`` (layers' own choices; ``| g64×20 g128×10``
        where layers give their own group sizes or the plan's is not the default 64; ``| k_proj 8b×30`` after them
        for modules' own, the four most common; ``| DoRA`` for DoRA adapters, ``| expert adapters`` for adapters on
        routed experts)."""

        def runs(values: Iterable[int], unit: str) -> str:
            counts: dict[int, int] = {}
            for v in values:
                counts[v] = counts.get(v, 0) + 1
            return " ".join(f"{unit}{v}×{n}" if unit in "rg" else f"{v}b×{n}" for v, n in sorted(counts.items()))

        own: dict[str, int] = {}
        for c in self.layers:
            for m in c.modules:
                text = " ".join([m.name] + [f"{m.bits}b"] * (m.bits != c.bits) + [f"r{m.rank}"] * (m.rank != c.rank)
                                + [f"g{m.group_size}"] * (m.group_size is not None))
                own[text] = own.get(text, 0) + 1
        groups = [c.group_size or self.group_size for c in self.layers]
        common = sorted(own.items(), key=lambda kv: (-kv[1], kv[0]))
        modules = ", ".join(f"{text}×{n}" for text, n in common[:4]) + (f", +{len(common) - 4} more"
                                                                         if len(common) > 4 else "")
        return (f"{runs(self.bits, 'b')} | {runs(self.ranks, 'r')}"
                + (f" | {runs(groups, 'g')}" if any(c.group_size for c in self.layers)
                   or self.group_size != DEFAULT_GROUP_SIZE else "")
                + (f" | {modules}" if modules else "")
                + (" | DoRA" if self.dora else "") + (" | expert adapters" if self.expert_adapters else ""))


def lora_config(plan: Plan, model, **overrides: Any):
    """The PEFT ``LoraConfig`` for ``plan`` on ``model``.

    ``rank_pattern``/``alpha_pattern`` keys are full module names, regex-escaped: PEFT matches a key as
    ``(.*\\.)?KEY$``, so an unescaped or partial key (``layers.1``) could select other layers
    (``layers.11``). The most common rank becomes the default ``r`` and only the others are listed.
    Routed experts (`architecture.ExpertLinears`) are excluded, or with ``expert_adapters`` each expert's linear is
    targeted by its name under the layer (``mlp.experts.down_proj.3``: PEFT matches a listed name as a suffix, and
    the index alone would match any module so numbered, ``layers.3``). Not one regex: for models whose experts
    transformers 5 re-laid out (Mixtral), PEFT rewrites a regex into the last parts of the names it matches.
    """
    from peft import LoraConfig

    plan.check_model(model)
    targets = plan.targets_in(linear_names(decoder_layers(model)[0][1]))
    holders = model_expert_holders(model)
    experts = holders if plan.expert_adapters else []
    adapted = {}  # full name → rank, of every module that gets an adapter
    for (layer_name, layer), choice in zip(decoder_layers(model), plan.layers):
        for name, _ in layer.named_modules():
            if name.rsplit(".", 1)[-1] in targets and name not in holders or name.rpartition(".")[0] in experts:
                adapted[f"{layer_name}.{name}"] = choice.of(name).rank
    ranks = list(adapted.values()) or plan.ranks
    default_r = max(set(ranks), key=lambda r: (ranks.count(r), r))
    rank_pattern = {re.escape(name): r for name, r in adapted.items() if r != default_r}
    alpha_pattern = {key: plan.alpha_ratio * r for key, r in rank_pattern.items()}
    # each layer's own experts (a model may keep some layers dense: Qwen2-MoE's mlp_only_layers)
    expert_linears = sorted({f"{h}.{e}" for _, layer in decoder_layers(model) for h in expert_holders(layer)
                             for e in range(len(layer.get_submodule(h)))}) if experts else []
    target_modules = [*targets, *expert_linears]
    if holders:  # the experts' containers end like the targets (``mlp.experts.down_proj``) but are no linears
        overrides = {"exclude_modules": holders, **overrides}
    kwargs = dict(
        r=default_r,
        lora_alpha=plan.alpha_ratio * default_r,
        lora_dropout=plan.dropout,
        target_modules=target_modules,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=plan.dora,
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _parse_layer(i: int, entry: Any) -> LayerChoice:
    """Layer ``i`` of a plan file: ``{"bits", "rank"}`` and, optionally, ``"group_size"`` and ``"modules"``: short
    name → its own ``{"bits"?, "rank"?, "group_size"?}`` (what it leaves out is the layer's)."""
    example = 'write e.g. {"bits": 4, "rank": 16} or {"bits": 4, "rank": 16, "modules": {"k_proj": {"bits": 8}}}'
    keys = {"bits", "rank", "group_size", "modules"}
    if not isinstance(entry, dict) or not {"bits", "rank"} <= set(entry) <= keys:
        raise PlanError(f"layer {i} is {entry!r}; each layer must be an object with 'bits' and 'rank' (and "
                        "optionally 'group_size' and 'modules')", example)
    modules = entry.get("modules", {})
    if not isinstance(modules, dict) or not all(
            isinstance(own, dict) and own and set(own) <= {"bits", "rank", "group_size"} for own in modules.values()):
        raise PlanError(f"layer {i}'s modules are {modules!r}; they must map module names to their own "
                        "{'bits'?, 'rank'?, 'group_size'?}", example)
    given = (entry["bits"], entry["rank"], entry.get("group_size", 1), *(v for o in modules.values() for v in o.values()))
    if not all(_is_int(v) for v in given):
        raise PlanError(f"layer {i} has non-integer bits, rank or group size: {entry!r}", "use integers")
    return LayerChoice(entry["bits"], entry["rank"],
                       tuple(ModuleChoice(name, own.get("bits", entry["bits"]), own.get("rank", entry["rank"]),
                                          own.get("group_size")) for name, own in modules.items()),
                       entry.get("group_size"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
