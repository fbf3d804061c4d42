"""What qradaptor knows about a model's architecture, in one place: where the decoder layers are, which
linears each holds, and which of them get LoRA adapters by default.

Every supported model is a decoder-only causal LM whose decoder layers form a ``layers`` ModuleList
(Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM, ...). Everything inside a decoder layer that is a plain
``nn.Linear`` is quantized by a plan; embeddings, norms and ``lm_head`` are not. The default adapter targets are
Llama's seven projections where the model names them so, and every linear of the layer where it does not (Phi-3's
fused ``qkv_proj`` and ``gate_up_proj``, ...): `resolve_targets`.
"""

from __future__ import annotations

from torch import nn

from .errors import ModelLoadError

#: The linears of a Llama-style decoder layer that get adapters unless a plan names others.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of every decoder layer, in order (``model.layers.0``, ...)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            # Names as they appear in this model, so a PEFT wrapper's prefix is kept.
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise ModelLoadError(
        f"{type(model).__name__} has no list of decoder layers (expected a `layers` ModuleList)",
        "use a decoder-only causal LM such as Llama, Mistral, Qwen or SmolLM",
    )


def layer_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The plain linears of one decoder layer (names relative to the layer)."""
    return [(n, m) for n, m in layer.named_modules() if type(m) is nn.Linear]


def linear_names(layer: nn.Module) -> tuple[str, ...]:
    """The short names (``q_proj``, ``qkv_proj``, ...) of a decoder layer's linears, plain or quantized, in order;
    a PEFT wrapper's own modules (``lora_A``, ``base_layer``) are not counted as names of their own."""
    from .backends.base import is_quantized

    names = []
    for name, module in layer.named_modules():
        if "lora_" in name or not (type(module) is nn.Linear or is_quantized(module)):
            continue
        names.append(name.removesuffix(".base_layer").rsplit(".", 1)[-1])
    return tuple(dict.fromkeys(names))


def resolve_targets(targets: tuple[str, ...], present: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The modules a plan's ``targets`` adapt in a layer whose linears are named ``present``: the default (Llama's
    seven names) means every linear of a layer that does not name its projections so; other targets are taken as
    they are (`Plan.check_model` refuses one the model lacks)."""
    targets = tuple(targets)
    if targets == DEFAULT_TARGET_MODULES and not set(targets) <= set(present):
        return tuple(dict.fromkeys(present))
    return targets
