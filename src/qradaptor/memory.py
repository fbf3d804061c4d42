"""The memory model: bytes of a plan from the model's shapes alone, the bytes a built model really holds,
budgets, and a training-memory estimate.

Predicted bytes = for every decoder-layer linear, the backend's stored weight (codes + one scale and one
zero per group, in the metadata dtype) or, at 16 bits, the dense weight at the base dtype;
+ LoRA ``r·(d_in + d_out)`` per adapted module at the adapter dtype (fp32: adapters are trained);
+ every other tensor (embeddings, norms, ``lm_head``, biases, buffers) at the base dtype.
Tied tensors count once. Adapters are part of the total: on a small model they are a real share.
"""

from __future__ import annotations

import re
import dataclasses
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .architecture import DEFAULT_TARGET_MODULES, resolve_targets
from .backends import QuantBackend, is_quantized
from .device import cpu_allocator
from .errors import BudgetError
from .plan import DEFAULT_RANK, UNQUANTIZED_BITS, LayerChoice, Plan


@dataclass(frozen=True)
class LinearShape:
    name: str  # relative to its decoder layer, e.g. "self_attn.q_proj"
    out_features: int
    in_features: int
    has_bias: bool
    expert: bool = False  # one routed expert's matrix (`architecture.ExpertLinears`): adapted only with expert_adapters

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass
class ModelShapes:
    """What the memory model needs to know about a model: no weights, only shapes."""

    layers: list[list[LinearShape]]  # per decoder layer, its linears
    other_numel: int  # floating tensors outside decoder linears (tied ones once), biases included
    # non-floating buffers, and computed tables (non-persistent floating buffers such as the rotary frequencies,
    # which a load in any dtype leaves float32), at their own dtype
    other_fixed_bytes: int = 0
    name: str = ""
    # weights of the decoder layers' ≥ 2-D tensors that no plan quantizes (in other_numel): routers, experts
    # modules `architecture.split_experts` cannot split
    unquantized_numel: int = 0

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelShapes":
        """The shapes of ``model``'s decoder linears, routed experts included whether they are split already
        (`architecture.split_experts`) or still 3-D tensors (priced as the split model's per-expert linears)."""
        from .architecture import decoder_layers, expert_holders, expert_weights, layer_linears, unquantized_matrices

        layers, linear_weights = [], set()
        for _, layer in decoder_layers(model):
            shapes = []
            holders = set(expert_holders(layer))
            for name, lin in layer_linears(layer):
                shapes.append(LinearShape(name, lin.out_features, lin.in_features, lin.bias is not None,
                                          expert=name.rpartition(".")[0] in holders))
                linear_weights.add(id(lin.weight))
            for name, module in layer.named_modules():
                for key in expert_weights(module):
                    weight = module._parameters[key]
                    shapes += [LinearShape(f"{name}.{key}.{e}", weight.shape[1], weight.shape[2], False, expert=True)
                               for e in range(weight.shape[0])]
                    linear_weights.add(id(weight))
            layers.append(shapes)
        unquantized = unquantized_matrices(model)[0]
        tables = {id(t) for m in model.modules() for k, t in m._buffers.items()
                  if t is not None and k in m._non_persistent_buffers_set}
        other, fixed, seen = 0, 0, set()
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in seen or id(t) in linear_weights:
                continue
            seen.add(id(t))
            if t.is_floating_point() and id(t) not in tables:
                other += t.numel()
            else:
                fixed += t.numel() * t.element_size()
        return cls(layers, other, fixed, getattr(getattr(model, "config", None), "_name_or_path", ""), unquantized)

    @classmethod
    def from_config(cls, config) -> "ModelShapes":
        """Shapes from a transformers config, building the model on the meta device (no memory, no weights)."""
        return cls.from_model(meta_model(config))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def expert_numel(self) -> int:
        """Weights of the routed experts' linears (quantized like the others; adapted with ``expert_adapters``)."""
        return sum(s.numel for layer in self.layers for s in layer if s.expert)

    @property
    def quantizable_numel(self) -> int:
        return sum(s.numel for layer in self.layers for s in layer)

    @property
    def total_numel(self) -> int:
        return self.quantizable_numel + self.other_numel

    def bytes_16bit(self) -> int:
        """The whole model at 16 bits, no adapters: the reference of ``0.3x`` budgets."""
        return 2 * self.total_numel + self.other_fixed_bytes


def meta_model(config) -> nn.Module:
    """The model of a transformers config built on the meta device: names and shapes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


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


#: What training adds per adapter parameter: its fp32 gradient and AdamW's two fp32 moments.
ADAPTER_STATE_BYTES = 12


def adapted_shapes(layer: list, target_modules: tuple[str, ...], expert_adapters: bool = False) -> list:
    """The linear shapes of a layer that a plan's targets adapt (`architecture.resolve_targets`), and its routed
    experts' with ``expert_adapters`` (`Plan.expert_adapters`)."""
    linears = [s for s in layer if not s.expert]
    targets = resolve_targets(target_modules, [s.name.rsplit(".", 1)[-1] for s in linears])
    return [s for s in layer if (expert_adapters if s.expert else s.name.rsplit(".", 1)[-1] in targets)]


def linear_bytes(shape: LinearShape, bits: int, rank: int, adapted: bool, backend: QuantBackend, *,
                 group_size: int, base_bytes: int, dora: bool = False) -> tuple[int, int]:
    """One linear at ``bits`` (packed, or dense at ``base_bytes`` per value when unquantized), with a rank-``rank``
    adapter when ``adapted`` (and, with ``dora``, its magnitude vector: one per output row): its weight bytes and its
    number of adapter parameters. A layer's price is the sum of its linears' (`layer_bytes`)."""
    if bits == UNQUANTIZED_BITS:
        weights = shape.numel * base_bytes
    else:
        weights = backend.weight_bytes(shape.out_features, shape.in_features, bits, group_size)
    params = rank * (shape.in_features + shape.out_features) + (shape.out_features if dora else 0) if adapted else 0
    return weights, params


def layer_bytes(layer: list, choice: LayerChoice, backend: QuantBackend, *, group_size: int,
                target_modules: tuple[str, ...], base_bytes: int, dora: bool = False,
                expert_adapters: bool = False) -> tuple[int, int]:
    """One decoder layer (its linears' shapes) under ``choice``, each linear at its own bits, rank and group size
    (`LayerChoice.of`, `linear_bytes`; ``group_size``: the plan's, where neither gives one): the bytes of its weights
    and the number of LoRA parameters its target modules get (with ``expert_adapters``, every routed expert's
    linears too).
    The one place a layer is priced: `predict` sums it, the search memoises it."""
    adapted = {s.name for s in adapted_shapes(layer, target_modules, expert_adapters)}
    weights = params = 0
    for s in layer:
        own = choice.of(s.name)
        w, p = linear_bytes(s, own.bits, own.rank, s.name in adapted, backend, group_size=own.group_size or group_size,
                            base_bytes=base_bytes, dora=dora)
        weights, params = weights + w, params + p
    return weights, params


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
    quantized = lora_params = 0
    per_layer = []
    for choice, layer in zip(plan.layers, shapes.layers):
        weights, params = layer_bytes(layer, choice, backend, group_size=plan.group_size,
                                      target_modules=plan.target_modules, base_bytes=base, dora=plan.dora,
                                      expert_adapters=plan.expert_adapters)
        lora_params += params
        quantized += weights
        per_layer.append(weights)
    lora = lora_params * adapter
    other = shapes.other_numel * base + shapes.other_fixed_bytes  # the linears' biases are in it
    n = shapes.quantizable_numel
    code_bits = sum(c.of(s.name).bits * s.numel for c, layer in zip(plan.layers, shapes.layers) for s in layer) / n
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


def measured_bytes(model: nn.Module) -> int:
    """Bytes actually held by ``model``'s tensors: each quantized module (of any backend) counts what it holds
    (scales and zeros included), everything else from its parameters and buffers. Shared tensors count once."""
    total, seen = 0, set()
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if is_quantized(module):
            total += module.held_bytes()
            skip_prefixes.append(name + ".")
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            key = (t.data_ptr(), t.numel()) if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------- budgets
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(?P<num>\d+(\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def uniform_bytes(shapes: ModelShapes, backend: QuantBackend, bits: float, *, rank: int = DEFAULT_RANK,
                  group_size: int = 64, base_dtype: torch.dtype | None = None,
                  target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES, dora: bool = False,
                  expert_adapters: bool = False) -> int:
    """Memory of every decoder layer at ``bits`` with ``rank`` adapters (DoRA ones with ``dora``) on
    ``target_modules`` (and on the routed experts with ``expert_adapters``).

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
        plan = Plan.uniform(shapes.num_layers, b, rank, group_size=group_size, target_modules=target_modules,
                            dora=dora, expert_adapters=expert_adapters)
        return predict(shapes, plan, backend, base_dtype=base_dtype).total_bytes

    if bits in supported:
        return at(int(bits))
    lo = max(b for b in supported if b < bits)
    hi = min(b for b in supported if b > bits)
    frac = (bits - lo) / (hi - lo)
    return round(at(lo) + frac * (at(hi) - at(lo)))


def parse_budget(text: str | int, shapes: ModelShapes, backend: QuantBackend, *, group_size: int = 64,
                 base_dtype: torch.dtype | None = None, target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
                 dora: bool = False, expert_adapters: bool = False) -> int:
    """Budget in bytes from ``4bit`` / ``3.5bit`` (memory of uniform bits at the default rank on ``target_modules``,
    DoRA adapters with ``dora``, the routed experts adapted too with ``expert_adapters``),
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
        return uniform_bytes(shapes, backend, value, group_size=group_size, base_dtype=base_dtype,
                             target_modules=target_modules, dora=dora, expert_adapters=expert_adapters)
    if unit == "x":
        if not 0 < value <= 1:
            raise BudgetError(f"a fraction budget must be in (0, 1], got {text!r}", "e.g. 0.3x")
        return int(value * shapes.bytes_16bit())
    if unit in ("", *_SIZE_UNITS):
        return int(value * _SIZE_UNITS.get(unit, 1))
    raise BudgetError(f"unknown unit {m['unit']!r} in budget {text!r}",
                      "use bit, x, B, kB, MB, GB, KiB, MiB or GiB")


def cheapest_plan(shapes: ModelShapes, backend: QuantBackend, *, bits_choices=None, rank_choices=(4, 8, 16, 32),
                  group_size: int = 64, target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> Plan:
    bits = min(bits_choices or backend.supported_bits)
    return Plan.uniform(shapes.num_layers, bits, min(rank_choices), group_size=group_size,
                        target_modules=target_modules)


def check_budget(budget_bytes: int, shapes: ModelShapes, backend: QuantBackend, *, bits_choices=None,
                 rank_choices=(4, 8, 16, 32), group_size: int = 64, base_dtype: torch.dtype | None = None,
                 target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> None:
    """Refuse a budget no plan in the search space can meet, naming the cheapest feasible memory."""
    plan = cheapest_plan(shapes, backend, bits_choices=bits_choices, rank_choices=rank_choices, group_size=group_size,
                         target_modules=target_modules)
    floor = predict(shapes, plan, backend, base_dtype=base_dtype).total_bytes
    if budget_bytes < floor:
        raise BudgetError(
            f"the budget {format_bytes(budget_bytes)} is below the cheapest possible plan "
            f"({plan.describe()}: {format_bytes(floor)} = {floor} bytes)",
            f"give a budget of at least {format_bytes(floor)} ({floor} bytes)",
        )


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks for reuse, so after quantizing a model, or after a training step, the process
    holds memory it no longer uses; this returns the free pages between steps (it cannot bound the growth
    within a step: see ALLOCATOR_RETENTION). Changes no setting.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (absent outside glibc)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


TRAINING_BUDGET_PREFIX = "train:"
GGUF_BUDGET_PREFIX = "gguf:"


def _prefixed_size(text, prefix: str, what: str) -> int | None:
    """Bytes of a budget written ``PREFIX SIZE``, or None when ``text`` does not start with ``prefix``."""
    if text is None or isinstance(text, int) or not str(text).strip().lower().startswith(prefix):
        return None
    rest = str(text).strip()[len(prefix):].strip().lower()
    m = _BUDGET_RE.match(rest)
    example = f"{prefix}1.5GiB, {prefix}1500MB or {prefix}1610612736 (bytes)"
    if not m or m["unit"] not in ("", *_SIZE_UNITS):
        raise BudgetError(f"cannot read the {what} budget {text!r}", f"write it as {prefix}SIZE, e.g. {example}")
    value = int(float(m["num"]) * _SIZE_UNITS.get(m["unit"], 1))
    if value <= 0:
        raise BudgetError(f"a {what} budget must be positive, got {text!r}", f"e.g. {prefix}1.5GiB")
    return value


def parse_training_budget(text: str | int | None) -> int | None:
    """Bytes of a budget on the peak training memory (``train:1.5GiB``, ``train:1500MB``), or None when
    ``text`` is not one (a budget on the stored model: see `parse_budget`)."""
    return _prefixed_size(text, TRAINING_BUDGET_PREFIX, "training-memory")


def parse_gguf_budget(text: str | int | None) -> int | None:
    """Bytes of a budget on the deployed files, ``model.gguf`` + ``adapter.gguf`` as ``export --gguf`` writes them
    (``gguf:120MB``), or None when ``text`` is not one."""
    return _prefixed_size(text, GGUF_BUDGET_PREFIX, "GGUF")


def fitting_batch(shapes: ModelShapes, plan: Plan, backend: QuantBackend, config, *, budget_bytes: int,
                  batch_size: int, seq_len: int, dtype: torch.dtype, checkpointing: bool) -> tuple[int, bool] | None:
    """The largest micro-batch size (≤ ``batch_size``) and checkpointing setting whose predicted training peak
    fits ``budget_bytes`` (at each size, checkpointing is turned on before the batch shrinks further), or None if
    even one block with checkpointing does not fit."""
    for b in range(batch_size, 0, -1):
        for ckpt in dict.fromkeys((checkpointing, True)):  # the current setting, then checkpointing on
            peak = training_memory(shapes, plan, backend, config, batch_size=b, seq_len=seq_len, dtype=dtype,
                                   checkpointing=ckpt).peak_bytes
            if peak <= budget_bytes:
                return b, ckpt
    return None


def check_training_budget(estimate: "TrainingMemory", budget_bytes: int, shapes: ModelShapes, plan: Plan,
                          backend: QuantBackend, config, *, dtype: torch.dtype, grad_accum: int = 1) -> None:
    """Refuse a run whose predicted training peak exceeds ``budget_bytes``, naming settings that fit."""
    if estimate.peak_bytes <= budget_bytes:
        return
    what = (f"the predicted training peak {format_bytes(estimate.peak_bytes)} (batches of {estimate.batch_size}×"
            f"{estimate.seq_len} tokens, gradient checkpointing {'on' if estimate.checkpointing else 'off'}) "
            f"exceeds the training-memory budget {format_bytes(budget_bytes)}")
    fit = fitting_batch(shapes, plan, backend, config, budget_bytes=budget_bytes, batch_size=estimate.batch_size,
                        seq_len=estimate.seq_len, dtype=dtype, checkpointing=estimate.checkpointing)
    if fit is None:
        floor = training_memory(shapes, plan, backend, config, batch_size=1, seq_len=estimate.seq_len, dtype=dtype,
                                checkpointing=True).peak_bytes
        raise BudgetError(what + f"; even one block with checkpointing needs {format_bytes(floor)}",
                          "use a shorter --seq-len, a plan with fewer bits or smaller ranks, or a larger budget")
    b, ckpt = fit
    steps = []
    if ckpt and not estimate.checkpointing:
        steps.append("--gradient-checkpointing")
    if b < estimate.batch_size:
        accum = grad_accum * estimate.batch_size / b
        steps.append(f"--batch-size {b}" + (f" --grad-accum {accum:g}" if accum == int(accum) else ""))
    raise BudgetError(what, f"pass {' '.join(steps)} (predicted to fit), or give a larger budget")


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------- training memory
#: Resident memory of a process that has imported torch, transformers, peft and qradaptor (430 MiB here), plus
#: what the runtime adds once training runs (autograd engine, thread pools): measured once on this project's
#: CPU machine, where glibc returned every freed block (benchmarks/memory.py, its `mmap128k` cases).
RUNTIME_BYTES = 500 * 2**20
#: The C heap keeps freed blocks for reuse, so while training a process also holds free memory, by how PyTorch
#: allocates (`qradaptor.device.cpu_allocator`). Fitted on this machine (benchmarks/memory.py, SmolLM2 cases at
#: 4×256 and 8×512 tokens): with glibc's defaults the retained memory grows to about 0.7× of what every layer's
#: activations take without checkpointing (what one step allocates in all; 0.5–0.9 across cases); on PyTorch's
#: huge-page path, qradaptor's default, to about 0.6× of the activations and loss alive at the peak (0.45–0.9).
#: An allocator that returns every freed block (MALLOC_MMAP_THRESHOLD_=131072) reaches the live peak, at twice
#: the step time.
ALLOCATOR_RETENTION = {"glibc": 0.7, "huge-pages": 0.6}
#: Logit values the chunked loss computes at once (qradaptor.evaluate.LOSS_CHUNK_VALUES).
_LOSS_CHUNK_VALUES = 2**23


@dataclass
class TrainingMemory:
    """Predicted peak resident memory of a LoRA training process, by part (bytes)."""

    runtime_bytes: int  # the interpreter and libraries (RUNTIME_BYTES)
    weights_bytes: int  # the (quantized) model with its adapters: `predict`
    gradient_bytes: int  # adapter gradients (fp32)
    optimizer_bytes: int  # AdamW's two fp32 moments
    activation_bytes: int  # what autograd keeps for backward at its peak (all layers, or layer inputs + one layer)
    loss_bytes: int  # logits and their gradient: one chunk (qradaptor) or the whole batch (plain transformers)
    allocator_bytes: int = 0  # freed memory the C heap keeps (ALLOCATOR_RETENTION)
    batch_size: int = 0
    seq_len: int = 0
    checkpointing: bool = True
    allocator: str = ""  # how the CPU heap was priced ("glibc", "huge-pages"); "" on a GPU

    @property
    def live_peak_bytes(self) -> int:
        """The peak of what is in use: an allocator that returns every freed block reaches this."""
        return (self.runtime_bytes + self.weights_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes + self.loss_bytes)

    @property
    def peak_bytes(self) -> int:
        """The predicted peak resident memory (with the free memory the heap keeps)."""
        return self.live_peak_bytes + self.allocator_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "live_peak_bytes": self.live_peak_bytes, "peak_bytes": self.peak_bytes}


def _layer_activation_values(config, tokens: int, ranks_by_module: int, dtype: torch.dtype,
                             dora_outputs: int = 0) -> tuple[int, int]:
    """Bytes one Llama-style decoder layer with LoRA on its linears keeps for backward, and the bytes of the
    gradients alive while that layer's backward runs, for ``tokens`` tokens.

    Kept (per token): both RMSNorms' fp32 inputs (2h·4), their outputs (2h), the query, key and value after RoPE
    (h + 2kv), the attention output and o_proj's input (2h), the MLP's gate, SiLU, up and product (4i), and
    every LoRA A output (Σr·4, fp32 adapters). With a 16-bit compute dtype PEFT's casts to the fp32 adapters keep
    another 2h + i fp32 values (counted with saved-tensor hooks). Frozen linears keep no weight. DoRA keeps, per
    adapted module, its base output and its fp32 LoRA output for the magnitude's gradient (``dora_outputs``: the
    adapted modules' output features summed).
    """
    a = _dtype_bytes(dtype)
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv_dim = kv * (getattr(config, "head_dim", None) or h // heads)
    kept = 2 * h * 4 + (2 * h + h + 2 * kv_dim + 2 * h + 4 * i) * a + ranks_by_module * 4 + dora_outputs * (a + 4)
    if a < 4:
        kept += (2 * h + i) * 4
    # Backward of one layer: the gradient of the residual stream and of the widest intermediate, in fp32.
    transient = (2 * h + 3 * i) * 4
    return kept * tokens, transient * tokens


def _token_shares(linears: list, config) -> dict:
    """Each linear → the share of a batch's tokens it computes: all of them, or for one of E routed experts of
    which each token picks ``config.num_experts_per_tok`` (k), k/E on average."""
    per_holder = Counter(s.name.rpartition(".")[0] for s in linears if s.expert)  # E, per expert projection
    k = getattr(config, "num_experts_per_tok", None) or 1
    return {s: (min(1.0, k / per_holder[s.name.rpartition(".")[0]]) if s.expert else 1.0) for s in linears}


def training_memory(shapes: ModelShapes, plan: Plan, backend: QuantBackend | None, config, *, batch_size: int,
                    seq_len: int, dtype: torch.dtype | None = None, checkpointing: bool = True,
                    plain_peft: bool = False, device: torch.device | str = "cpu",
                    allocator: str | None = None) -> TrainingMemory:
    """Predicted peak memory of training ``plan``'s adapters with AdamW on batches of ``batch_size × seq_len``.

    ``backend`` None means no quantization (every layer at ``dtype``). With ``checkpointing`` autograd keeps
    each decoder layer's input and recomputes one layer at a time in backward; without, every layer's
    activations. ``plain_peft`` prices the loss as plain transformers computes it (the whole batch's logits in
    fp32 with their gradient) instead of qradaptor's chunked loss. ``peak_bytes`` adds the free memory the C
    heap retains (`ALLOCATOR_RETENTION` for ``allocator``, "glibc" or "huge-pages"; None: how this process
    allocates, `qradaptor.device.cpu_allocator`); ``live_peak_bytes`` is what is in use. Checked on SmolLM2-135M and a
    1B shape on CPU (benchmarks/memory.py); an estimate for Llama-style models, not a bound.

    On a CUDA ``device`` the prediction is of PyTorch's allocations on the GPU (``torch.cuda.max_memory_allocated``):
    no interpreter share and no heap retention (the caching allocator's spare blocks are not allocations). Not yet
    checked against a GPU measurement.
    """
    on_gpu = torch.device(device).type == "cuda"
    if not on_gpu and allocator is None:
        allocator = cpu_allocator()
    dtype = dtype or (backend.compute_dtype if backend is not None else torch.float32)
    if backend is None:
        plan = dataclasses.replace(plan, layers=[c.unquantized() for c in plan.layers])
        from .backends import get_backend

        backend = get_backend("reference", compute_dtype=dtype)  # only consulted for 16-bit layers' dtype
    report = predict(shapes, plan, backend, base_dtype=dtype)
    tokens = batch_size * seq_len
    a = _dtype_bytes(dtype)
    # per layer, its adapted linears, each with the share of the tokens it sees: a routed expert's about k/E
    adapted = [_token_shares(adapted_shapes(layer, plan.target_modules, plan.expert_adapters), config)
               for layer in shapes.layers]
    layer_costs = [_layer_activation_values(config, tokens, round(sum(c.of(s.name).rank * share
                                                                      for s, share in n.items())), dtype,
                                            sum(s.out_features for s in n) if plan.dora else 0)
                   for c, n in zip(plan.layers, adapted)]
    embeddings = tokens * config.hidden_size * a
    every_layer = embeddings + sum(k for k, _ in layer_costs) + max(t for _, t in layer_costs)
    if checkpointing:
        activations = (len(layer_costs) + 1) * embeddings + max(k + t for k, t in layer_costs)
    else:
        activations = every_layer
    vocab = config.vocab_size
    if plain_peft:
        loss = tokens * vocab * (a + 4 + 4)  # logits, their fp32 upcast and its gradient
    else:
        loss = min(tokens, max(1, _LOSS_CHUNK_VALUES // vocab)) * vocab * (a + 4 + 4)
    # what the heap's retained free memory grows with (see ALLOCATOR_RETENTION)
    retained_from = every_layer if allocator == "glibc" else activations + loss
    return TrainingMemory(runtime_bytes=0 if on_gpu else RUNTIME_BYTES, weights_bytes=report.total_bytes,
                          gradient_bytes=report.trainable_params * 4, optimizer_bytes=report.trainable_params * 8,
                          activation_bytes=int(activations), loss_bytes=int(loss),
                          allocator_bytes=0 if on_gpu else int(ALLOCATOR_RETENTION[allocator] * retained_from), batch_size=batch_size,
                          seq_len=seq_len, checkpointing=checkpointing, allocator="" if on_gpu else allocator)
