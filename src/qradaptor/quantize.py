"""Apply a plan to a model: quantize each decoder layer's linears at that layer's bits, then attach
LoRA adapters with that layer's rank.

Everything outside the decoder layers (embeddings, norms, ``lm_head``) stays unquantized at the base
dtype; a layer whose plan says 16 bits keeps its linears unquantized too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .architecture import EXPERTS_IMPLEMENTATION, ExpertLinears, decoder_layers, layer_linears, split_experts
from .backends import QuantBackend, QuantCache, get_backend
from .device import model_device
from .models import convert_weights, quiet_peft_wrapping
from .plan import UNQUANTIZED_BITS, Plan, lora_config
from .threads import rebalance


def _own_storage(model: nn.Module) -> None:
    """Give every remaining tensor its own memory. ``from_pretrained`` in the file's dtype maps the safetensors
    file and its tensors view that mapping: while one of them (an embedding) is alive the whole file stays
    mapped, and every page read while loading stays resident, freed linears included (+300 MiB on SmolLM2 fp32,
    benchmarks/memory.py)."""
    with torch.no_grad():
        for module in model.modules():
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None and t.device.type == "cpu" and t.is_floating_point():
                    t.data = t.data.clone()


def set_child(layer: nn.Module, name: str, module: nn.Module | None) -> None:
    """Put ``module`` in ``layer`` at the dotted ``name`` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    setattr(layer.get_submodule(parent_name) if parent_name else layer, child, module)


def resolve_backend(backend: str | QuantBackend | None, dtype: torch.dtype) -> QuantBackend:
    if isinstance(backend, QuantBackend):
        return backend
    return get_backend(backend or "hqq", compute_dtype=dtype)


def quantize_model(
    model: nn.Module,
    plan: Plan,
    backend: str | QuantBackend | None = None,
    *,
    cache: QuantCache | None = None,
    dtype: torch.dtype | None = None,
    inplace: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The model with every decoder-layer linear replaced by its quantized version per ``plan``.

    ``model`` is left intact unless ``inplace``. ``dtype`` (default: the backend's compute dtype) is the
    base dtype of everything left unquantized. ``device`` (default: where ``model`` is): where the result
    lives; each linear is moved there on its own and quantized there, so the device never holds the whole
    full-precision model.
    """
    split_experts(model)  # routed experts as per-expert linears (in place, no copy): quantized like the others
    plan.check_model(model)
    if cache is not None:
        backend = cache.backend
    backend = resolve_backend(backend, dtype or torch.float32)
    dtype = dtype or backend.compute_dtype
    device = torch.device(device) if device is not None else model_device(model)
    for bits in plan.bit_widths:
        if bits != UNQUANTIZED_BITS:
            backend.check_bits(bits)
    # The linears to quantize are never copied or converted: the copy gets empty slots in their place (in
    # place, their slots are emptied), and each is quantized from the source and dropped in turn, so the
    # peak holds one full-precision model plus one linear, never two copies of the model.
    targets = []
    for index, (_, layer) in enumerate(decoder_layers(model)):
        for name, linear in layer_linears(layer):
            bits, group_size = plan.layers[index].of(name).bits, plan.group_size_of(index, name)
            if bits != UNQUANTIZED_BITS:
                backend.check_shape(linear.out_features, linear.in_features, group_size)
                targets.append((index, name, linear, bits, group_size))
    if inplace:
        out = model
        layers = decoder_layers(out)
        for index, name, *_ in targets:
            set_child(layers[index][1], name, None)
    else:
        out = copy.deepcopy(model, memo={id(linear): None for _, _, linear, *_ in targets})
    convert_weights(out, dtype)  # as a load in ``dtype``: the rotary tables stay float32
    out_layers = decoder_layers(out)
    targets.reverse()
    while targets:
        index, name, source_linear, bits, group_size = targets.pop()
        rebalance()  # the share of the cores, while a process that started beside this one loads its model
        layer_name, layer = out_layers[index]
        if cache is not None:
            q = cache.get(f"{layer_name}.{name}", source_linear, bits, group_size, device=device)
        else:
            if source_linear.weight.device != device:  # in place the source moves (and is freed below); else a copy
                source_linear = (source_linear if inplace else copy.deepcopy(source_linear)).to(device)
            q = backend.quantize(source_linear, bits, group_size)
        set_child(layer, name, q)
        del source_linear  # in place, the last reference: that weight is freed now
    out.to(device)  # what was not quantized: embeddings, norms, 16-bit layers
    if inplace:
        _own_storage(out)
    out.requires_grad_(False)
    return out


def add_adapters(model: nn.Module, plan: Plan, *, seed: int = 0):
    """Wrap a (quantized) model with trainable LoRA adapters whose ranks follow ``plan``."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # adapter initialisation is random: make it reproducible
    with quiet_peft_wrapping():
        return get_peft_model(model, lora_config(plan, model))


def prepare_model(model, plan: Plan, backend: str | QuantBackend | None = None, *, cache: QuantCache | None = None,
                  dtype: torch.dtype | None = None, seed: int = 0, device: torch.device | str | None = None):
    """Quantized copy of ``model`` per ``plan`` (on ``device``, default: where ``model`` is) with LoRA adapters
    attached, ready to train."""
    return add_adapters(quantize_model(model, plan, backend, cache=cache, dtype=dtype, device=device), plan, seed=seed)


def dequantized_model(model: nn.Module, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """A plain model of ``model``'s class (a PEFT model: of its base model's) in ``dtype`` on ``device`` (the CPU
    by default: an export writes it, a GPU need not hold it) whose weights are exactly what ``model``'s layers
    compute with: each quantized linear dequantized, every other tensor copied, adapters left out. ``model`` is
    not changed; tied weights stay tied."""
    from .backends import is_quantized

    source = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):  # the skeleton only: every tensor is set below
        dense = type(source)(copy.deepcopy(source.config))
    if getattr(dense.config, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION:
        dense.config._experts_implementation = "eager"  # its experts are 3-D tensors again (transformers' own loop)
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(source) -> (source, copy): ties stay tied

    def copied(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in copies:
            c = t.detach().to(device, dtype if parameter and t.is_floating_point() else t.dtype, copy=True)
            copies[id(t)] = (t, nn.Parameter(c, requires_grad=False) if parameter else c)
        return copies[id(t)][1]

    with torch.no_grad():
        for name, module in dense.named_modules():
            src = source.get_submodule(name) if name else source
            src = getattr(src, "base_layer", src)  # PEFT's LoRA wrapper: the layer it wraps
            for key, value in list(module._parameters.items()):
                if isinstance(getattr(src, key, None), ExpertLinears):  # split routed experts: 3-D again
                    module._parameters[key] = nn.Parameter(getattr(src, key).fused().to(device, dtype),
                                                           requires_grad=False)
                elif value is not None:
                    module._parameters[key] = (
                        nn.Parameter(src.dequantize().to(device, dtype), requires_grad=False)
                        if is_quantized(src) and key == "weight" else copied(getattr(src, key), True))
            for key, value in list(module._buffers.items()):
                if value is not None:
                    module._buffers[key] = copied(getattr(src, key), False)
    dense.generation_config = copy.deepcopy(source.generation_config)
    dense.config.architectures = [type(dense).__name__]
    return dense.eval()
