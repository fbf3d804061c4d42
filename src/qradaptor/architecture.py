"""What qradaptor knows about a model's architecture, in one place: where the decoder layers are, which
linears each holds, and which of them get LoRA adapters by default.

Every supported model is a decoder-only causal LM whose decoder layers form a ModuleList under its decoder stack
(``model.layers`` in Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM, ...; ``gpt_neox.layers`` in GPT-NeoX), followed
by a final norm and the LM head (`check_supported` refuses anything else, naming what is missing). Everything inside a decoder layer that is a plain
``nn.Linear`` is quantized by a plan; embeddings, norms and ``lm_head`` are not. The default adapter targets are
Llama's seven projections where the model names them so, and every linear of the layer where it does not (Phi-3's
fused ``qkv_proj`` and ``gate_up_proj``, ...): `resolve_targets`.
"""

from __future__ import annotations

from torch import nn

from .errors import ModelLoadError

#: The linears of a Llama-style decoder layer that get adapters unless a plan names others.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


#: Names of the norm applied to the last decoder layer's output, under the decoder stack (Llama's ``norm``,
#: GPT-NeoX's ``final_layer_norm``, Phi's ``final_layernorm``, Falcon's ``ln_f``).
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "norm_f")


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(full name, module)`` of every decoder layer, in order (``model.layers.0``, ``gpt_neox.layers.0``, ...):
    the first ModuleList named ``layers``, else the first one with ``config.num_hidden_layers`` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found = next(((n, m) for n, m in lists if n.endswith("layers")), None) or next(
        ((n, m) for n, m in lists if len(m) == count), None)
    if found is None:
        raise ModelLoadError(
            f"{type(model).__name__} has no list of decoder layers (a ModuleList named `layers`, or one of "
            f"config.num_hidden_layers = {count} blocks)",
            "use a decoder-only causal LM such as Llama, Mistral, Qwen, Gemma, Phi-3 or GPT-NeoX",
        )
    name, layers = found
    # Names as they appear in this model, so a PEFT wrapper's prefix is kept.
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers)]


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack under the LM head, whose output is ``last_hidden_state`` after the final norm
    (``model.model``, GPT-NeoX's ``model.gpt_neox``); a PEFT wrapper's base model's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = getattr(base, "base_model", None)  # transformers: the module named by base_model_prefix
    if not isinstance(stack, nn.Module) or stack is base:
        raise ModelLoadError(f"{type(base).__name__} has no decoder stack under its LM head (its base_model)",
                             "use a transformers *ForCausalLM model")
    return stack


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the decoder stack applies after its last layer (see `FINAL_NORM_NAMES`)."""
    stack = backbone(model)
    for name in FINAL_NORM_NAMES:
        module = getattr(stack, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ModelLoadError(f"{type(stack).__name__} has no final norm named any of {list(FINAL_NORM_NAMES)}",
                         "use a decoder-only causal LM such as Llama, Mistral, Qwen, Gemma, Phi-3 or GPT-NeoX")


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse, naming what is missing, a model the stages cannot work on: not a decoder-only causal LM, no list of
    decoder layers, no decoder stack or final norm to run the profile's suffixes through, or decoder layers that
    hold no ``nn.Linear`` to quantize (GPT-2's ``Conv1D``)."""
    what = f"{name} is a {type(model).__name__}, which qradaptor does not support"
    fix = "use a decoder-only causal LM: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2, Granite, StableLM, GPT-NeoX"
    if getattr(model.config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise ModelLoadError(f"{what}: it is not a decoder-only causal LM with an LM head", fix)
    try:
        layers = decoder_layers(model)
        final_norm(model)
    except ModelLoadError as e:
        raise ModelLoadError(f"{what}: {e.cause}", fix) from None
    if not layer_linears(layers[0][1]):
        kinds = sorted({type(m).__name__ for m in layers[0][1].modules() if getattr(m, "weight", None) is not None
                        and m.weight.dim() == 2 and not isinstance(m, nn.Embedding)})
        raise ModelLoadError(f"{what}: its decoder layers hold no nn.Linear to quantize (their weights are in "
                             f"{kinds or 'no 2-D module'})", fix)


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
