"""What qradaptor knows about a model's architecture, in one place: where the decoder layers are, which
linears each holds, and which of them get LoRA adapters by default.

Every supported model is a decoder-only causal LM whose decoder layers form a ``layers`` ModuleList
(Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM, ...). Everything inside a decoder layer that is a plain
``nn.Linear`` is quantized by a plan; embeddings, norms and ``lm_head`` are not.
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
