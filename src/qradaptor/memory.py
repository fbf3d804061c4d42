"""The memory model: bytes of a plan from the model's shapes alone, the bytes a built model really holds,
budgets, and a training-memory estimate.

Predicted bytes = for every decoder-layer linear, the backend's stored weight (codes + one scale and one
zero per group, in the metadata dtype) or, at 16 bits, the dense weight at the base dtype;
+ LoRA ``r·(d_in + d_out)`` per adapted module at the adapter dtype (fp32: adapters are trained);
+ every other tensor (embeddings, norms, ``lm_head``, biases, buffers) at the base dtype.
Tied tensors count once. Adapters are part of the total: on a small model they are a real share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .backends import QuantBackend
from .errors import BudgetError
from .plan import DEFAULT_RANK, UNQUANTIZED_BITS, Plan


@dataclass(frozen=True)
class LinearShape:
    name: str  # relative to its decoder layer, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    has_bias: bool

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass
class ModelShapes:
    """What the memory model needs to know about a model: no weights, only shapes."""

    layers: list[list[LinearShape]]  # per decoder layer, its linears
    other_numel: int  # floating tensors outside decoder linears (tied ones once), biases included
    other_fixed_bytes: int = 0  # non-floating buffers, at their own dtype
    name: str = ""

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelShapes":
        from .quantize import decoder_layers, layer_linears

        layers, linear_weights = [], set()
        for _, layer in decoder_layers(model):
            shapes = []
            for name, lin in layer_linears(layer):
                shapes.append(LinearShape(name, lin.out_features, lin.in_features, lin.bias is not None))
                linear_weights.add(id(lin.weight))
            layers.append(shapes)
        other, fixed, seen = 0, 0, set()
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in seen or id(t) in linear_weights:
                continue
            seen.add(id(t))
            if t.is_floating_point():
                other += t.numel()
            else:
                fixed += t.numel() * t.element_size()
        return cls(layers, other, fixed, getattr(getattr(model, "config", None), "_name_or_path", ""))

    @classmethod
    def from_config(cls, config) -> "ModelShapes":
        """Shapes from a transformers config, building the model on the meta device (no memory, no weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def quantizable_numel(self) -> int:
        return sum(s.numel for layer in self.layers for s in layer)

    @property
    def total_numel(self) -> int:
        return self.quantizable_numel + self.other_numel

    def bytes_16bit(self) -> int:
        """The whole model at 16 bits, no adapters: the reference of ``0.3x`` budgets."""
        return 2 * self.total_numel + self.other_fixed_bytes


@dataclass
class MemoryReport:
    total_bytes: int
    quantized_bytes: int  # decoder-layer linears: codes + metadata (or dense, at 16 bits)
    lora_bytes: int
    other_bytes: int  # embeddings, norms, lm_head, biases, buffers
    avg_bits: float  # stored bits per decoder-linear weight, metadata included
    code_bits: float  # the plan's nominal bits per decoder-linear weight
    trainable_params: int
    per_layer_bytes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "predicted_bytes": self.total_bytes,
            "quantized_bytes": self.quantized_bytes,
            "lora_bytes": self.lora_bytes,
            "other_bytes": self.other_bytes,
            "avg_bits": round(self.avg_bits, 4),
            "code_bits": round(self.code_bits, 4),
            "trainable_params": self.trainable_params,
        }


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def predict(
    shapes: ModelShapes,
    plan: Plan,
    backend: QuantBackend,
    *,
    base_dtype: torch.dtype | None = None,
    adapter_dtype: torch.dtype = torch.float32,
) -> MemoryReport:
    """Bytes the model built from ``plan`` will hold, from shapes alone."""
    if plan.num_layers != shapes.num_layers:
        from .errors import PlanError

        raise PlanError(
            f"plan has {plan.num_layers} layers but the model has {shapes.num_layers} decoder layers",
            "make a plan for this model (one {bits, rank} per decoder layer)",
        )
    base = _dtype_bytes(base_dtype or backend.compute_dtype)
    adapter = _dtype_bytes(adapter_dtype)
    quantized = lora_params = bias_numel = 0
    per_layer = []
    for choice, layer in zip(plan.layers, shapes.layers):
        layer_bytes = 0
        for s in layer:
            if choice.bits == UNQUANTIZED_BITS:
                w = s.numel * base
            else:
                w = backend.weight_bytes(s.out_features, s.in_features, choice.bits, plan.group_size)
            layer_bytes += w
            if s.has_bias:
                bias_numel += s.out_features
            if s.name.rsplit(".", 1)[-1] in plan.target_modules:
                lora_params += choice.rank * (s.in_features + s.out_features)
        quantized += layer_bytes
        per_layer.append(layer_bytes)
    lora = lora_params * adapter
    other = (shapes.other_numel + bias_numel) * base + shapes.other_fixed_bytes
    n = shapes.quantizable_numel
    code_bits = sum(c.bits * sum(s.numel for s in layer) for c, layer in zip(plan.layers, shapes.layers)) / n
    return MemoryReport(
        total_bytes=quantized + lora + other,
        quantized_bytes=quantized,
        lora_bytes=lora,
        other_bytes=other,
        avg_bits=8 * quantized / n,
        code_bits=code_bits,
        trainable_params=lora_params,
        per_layer_bytes=per_layer,
    )


def measured_bytes(model: nn.Module, backend: QuantBackend | None = None) -> int:
    """Bytes actually held by ``model``'s tensors: quantized modules through their backend (scales and
    zeros included), everything else from its parameters and buffers. Shared tensors count once."""
    backend = backend or _find_backend(model)
    total, seen = 0, set()
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if backend is not None and backend.is_quantized(module):
            total += backend.held_bytes(module)
            skip_prefixes.append(name + ".")
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _find_backend(model: nn.Module) -> QuantBackend | None:
    # quantize_model tags the transformers model; PEFT wraps it a few levels deep.
    for m in model.modules():
        backend = m.__dict__.get("qradaptor_backend")
        if backend is not None:
            return backend
    return None


# ---------------------------------------------------------------------------------------- budgets
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(?P<num>\d+(\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def uniform_bytes(shapes: ModelShapes, backend: QuantBackend, bits: float, *, rank: int = DEFAULT_RANK,
                  group_size: int = 64, base_dtype: torch.dtype | None = None) -> int:
    """Memory of every decoder layer at ``bits`` with ``rank`` adapters.

    For a bit-width the backend stores this is the real uniform plan; between two stored bit-widths
    (``3.5``) it is the linear interpolation of their uniform plans.
    """
    supported = sorted(b for b in backend.supported_bits)
    if not supported[0] <= bits <= supported[-1]:
        raise BudgetError(
            f"a {bits:g}-bit budget is outside what the {backend.name} backend stores ({supported[0]}–{supported[-1]} bits)",
            f"give a budget between {supported[0]}bit and {supported[-1]}bit, or in bytes (e.g. 350MB)",
        )

    def at(b: int) -> int:
        plan = Plan.uniform(shapes.num_layers, b, rank, group_size=group_size)
        return predict(shapes, plan, backend, base_dtype=base_dtype).total_bytes

    if bits in supported:
        return at(int(bits))
    lo = max(b for b in supported if b < bits)
    hi = min(b for b in supported if b > bits)
    frac = (bits - lo) / (hi - lo)
    return round(at(lo) + frac * (at(hi) - at(lo)))


def parse_budget(text: str | int, shapes: ModelShapes, backend: QuantBackend, *, group_size: int = 64,
                 base_dtype: torch.dtype | None = None) -> int:
    """Budget in bytes from ``4bit`` / ``3.5bit`` (memory of uniform bits at the default rank),
    ``350MB`` / ``1.2GiB`` / ``123456789`` (bytes), or ``0.3x`` (fraction of the 16-bit model)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower()
    if s.endswith("bits"):
        s = s[:-1]
    m = _BUDGET_RE.match(s)
    if not m:
        raise BudgetError(
            f"cannot read the budget {text!r}",
            "write it as average bits (4bit, 3.5bit), bytes (350MB, 1.2GiB, 123456789) or a fraction of the 16-bit model (0.3x)",
        )
    value, unit = float(m["num"]), m["unit"]
    if unit == "bit":
        return uniform_bytes(shapes, backend, value, group_size=group_size, base_dtype=base_dtype)
    if unit == "x":
        if not 0 < value <= 1:
            raise BudgetError(f"a fraction budget must be in (0, 1], got {text!r}", "e.g. 0.3x")
        return int(value * shapes.bytes_16bit())
    if unit in ("", *_SIZE_UNITS):
        return int(value * _SIZE_UNITS.get(unit, 1))
    raise BudgetError(f"unknown unit {m['unit']!r} in budget {text!r}",
                      "use bit, x, B, kB, MB, GB, KiB, MiB or GiB")


def cheapest_plan(shapes: ModelShapes, backend: QuantBackend, *, bits_choices=None, rank_choices=(4, 8, 16, 32),
                  group_size: int = 64) -> Plan:
    bits = min(bits_choices or backend.supported_bits)
    return Plan.uniform(shapes.num_layers, bits, min(rank_choices), group_size=group_size)


def check_budget(budget_bytes: int, shapes: ModelShapes, backend: QuantBackend, *, bits_choices=None,
                 rank_choices=(4, 8, 16, 32), group_size: int = 64, base_dtype: torch.dtype | None = None) -> None:
    """Refuse a budget no plan in the search space can meet, naming the cheapest feasible memory."""
    plan = cheapest_plan(shapes, backend, bits_choices=bits_choices, rank_choices=rank_choices, group_size=group_size)
    floor = predict(shapes, plan, backend, base_dtype=base_dtype).total_bytes
    if budget_bytes < floor:
        raise BudgetError(
            f"the budget {format_bytes(budget_bytes)} is below the cheapest possible plan "
            f"({plan.describe()}: {format_bytes(floor)} = {floor} bytes)",
            f"give a budget of at least {format_bytes(floor)} ({floor} bytes)",
        )


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------- training memory
@dataclass
class TrainingEstimate:
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**self.__dict__, "total_bytes": self.total_bytes}


def training_estimate(shapes: ModelShapes, plan: Plan, backend: QuantBackend, config, *, batch_size: int,
                      seq_len: int, base_dtype: torch.dtype | None = None) -> TrainingEstimate:
    """Rough training peak: weights + LoRA gradients + AdamW's two fp32 moments + saved activations.

    Activations per decoder layer keep about ``b·s·(6h + 2·kv + 4·i + heads·s)`` values (norm inputs,
    q/k/v, attention output, the MLP's gate/up/act/product, attention probabilities), and the logits
    ``b·s·V`` are held in fp32 twice (values and their gradient). An estimate, not a bound.
    """
    report = predict(shapes, plan, backend, base_dtype=base_dtype)
    act_bytes = _dtype_bytes(base_dtype or backend.compute_dtype)
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (h // heads)
    per_layer = batch_size * seq_len * (6 * h + 2 * kv + 4 * i + heads * seq_len)
    lora_acts = batch_size * seq_len * sum(plan.ranks) * len(plan.target_modules)
    activations = (per_layer * shapes.num_layers + lora_acts) * act_bytes + 2 * batch_size * seq_len * config.vocab_size * 4
    return TrainingEstimate(
        weights_bytes=report.total_bytes,
        gradient_bytes=report.trainable_params * 4,
        optimizer_bytes=report.trainable_params * 8,
        activation_bytes=int(activations),
    )


def plan_memory(model: str | None, plan: "Plan | str", *, backend: str = "hqq", dtype: torch.dtype = torch.float32,
                measure: bool = False, budget: str | int | None = None) -> dict:
    """What ``qradaptor memory`` prints: the plan's predicted bytes from the model's config alone;
    with ``measure``, the bytes the built model (quantized base + adapters) really holds; with
    ``budget``, the budget in bytes and whether the plan fits it."""
    from .backends import get_backend
    from .models import load_config, load_model

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    quant = get_backend(backend, compute_dtype=dtype)
    shapes = ModelShapes.from_config(load_config(model))
    report = predict(shapes, plan, quant)
    out = {**report.to_dict(), "plan": plan.describe(), "backend": quant.name}
    if budget is not None:
        budget_bytes = parse_budget(budget, shapes, quant, group_size=plan.group_size)
        check_budget(budget_bytes, shapes, quant, group_size=plan.group_size)
        out.update(budget_bytes=budget_bytes, fits=report.total_bytes <= budget_bytes)
    if measure:
        from .quantize import prepare_model

        base, _ = load_model(model)
        out["measured_bytes"] = measured_bytes(prepare_model(base, plan, quant))
    return out
