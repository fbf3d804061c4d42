"""What qradaptor knows about a model's architecture, in one place: where the decoder layers are, which
linears each holds, and which of them get LoRA adapters by default.

Every supported model is a decoder-only causal LM whose decoder layers form a ModuleList under its decoder stack
(``model.layers`` in Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM, ...; ``gpt_neox.layers`` in GPT-NeoX), followed
by a final norm and the LM head (`check_supported` refuses anything else, naming what is missing). Everything
inside a decoder layer that is a plain ``nn.Linear`` is quantized by a plan, routed experts included once
`split_experts` has made them linears; embeddings, norms and ``lm_head`` are not. The default adapter targets are
Llama's seven projections where the model names them so, and every linear of the layer where it does not (Phi-3's
fused ``qkv_proj`` and ``gate_up_proj``, ...): `resolve_targets`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    """The plain linears of one decoder layer (names relative to the layer), routed experts' included
    (``mlp.experts.down_proj.3``: see `ExpertLinears`)."""
    return [(n, m) for n, m in layer.named_modules() if type(m) is nn.Linear]


def expert_holders(layer: nn.Module) -> list[str]:
    """Names (relative to the layer) of the layer's `ExpertLinears`: ``mlp.experts.gate_up_proj``, ..."""
    return [n for n, m in layer.named_modules() if isinstance(m, ExpertLinears)]


def model_expert_holders(model: nn.Module) -> list[str]:
    """The `ExpertLinears` names of every decoder layer of ``model``, relative to the layer, sorted: what PEFT must
    exclude so that routed experts get no adapters (their names end like the targets: ``mlp.experts.down_proj``)."""
    return sorted({h for _, layer in decoder_layers(model) for h in expert_holders(layer)})


def linear_names(layer: nn.Module) -> tuple[str, ...]:
    """The short names (``q_proj``, ``qkv_proj``, ...) of a decoder layer's linears, plain or quantized, in order;
    a PEFT wrapper's own modules (``lora_A``, ``base_layer``) and the routed experts' per-expert linears are not
    counted as names of their own (target modules do not select experts: `Plan.expert_adapters` does)."""
    from .backends.base import is_quantized

    holders = set(expert_holders(layer))
    names = []
    for name, module in layer.named_modules():
        if "lora_" in name or not (type(module) is nn.Linear or is_quantized(module)):
            continue
        if name.rpartition(".")[0] in holders:
            continue
        names.append(name.removesuffix(".base_layer").rsplit(".", 1)[-1])
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------- routed experts
#: What transformers names an experts module's 3-D weights (experts × out × in).
EXPERT_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
#: The experts implementation (transformers' ``config._experts_implementation``) of a model whose experts are split.
EXPERTS_IMPLEMENTATION = "qradaptor"


class ExpertLinears(nn.Module):
    """One projection of a layer's routed experts (transformers keeps it as a 3-D ``experts × out × in``
    parameter) as one ``nn.Linear`` per expert, named by its index, so that a plan quantizes each expert's matrix
    like any linear of the layer (same backend, the layer's bits) and the memory model prices it so. Each linear's
    weight is a view of the 3-D tensor: splitting copies nothing."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        for e in range(weight.shape[0]):
            linear = nn.Linear(weight.shape[2], weight.shape[1], bias=False, device="meta")
            linear.weight = nn.Parameter(weight[e], requires_grad=False)
            self.add_module(str(e), linear)

    def __len__(self) -> int:
        return len(self._modules)

    def weight(self, e) -> torch.Tensor:
        """Expert ``e``'s dense ``(out, in)`` weight (dequantized if quantized; without its adapter, if any)."""
        from .backends.base import is_quantized

        module = self._modules[str(int(e))]
        module = getattr(module, "base_layer", module)  # a PEFT wrapper (adapters on experts)
        return module.dequantize() if is_quantized(module) else module.weight

    __getitem__ = weight  # transformers' eager experts forward reads ``self.down_proj[expert_idx]``

    def linear(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` through expert ``e``, its adapter included when it has one: a quantized weight is dequantized
        and not kept for backward (the quantized modules' own forward, `backends.base.dequant_linear`)."""
        return self._modules[str(e)](x)

    def fused(self) -> torch.Tensor:
        """The 3-D ``experts × out × in`` weight, as transformers stores it."""
        return torch.stack([self.weight(e) for e in range(len(self))])


def expert_weights(module: nn.Module) -> list[str]:
    """The names of ``module``'s 3-D expert weights when it is a transformers experts module that `split_experts`
    can split (its weights ``out × in`` per expert, no biases, no norm after the experts), else []."""
    if getattr(module, "is_transposed", None) is not False or getattr(module, "has_bias", None) is not False \
            or getattr(module, "has_post_expert_norm", False) or not hasattr(module, "num_experts"):
        return []
    return [n for n in EXPERT_WEIGHT_NAMES
            if isinstance(module._parameters.get(n), torch.Tensor) and module._parameters[n].dim() == 3]


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop over split experts (`ExpertLinears.linear`): each routed token through
    its experts, a quantized expert's weight dequantized on the fly and never kept for backward."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():  # index num_experts: a token routed to no local expert (expert parallelism)
        routed = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = [e for e in (routed.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist() if e < self.num_experts]
    for e in hit:
        position, token = torch.where(routed[e])
        x = hidden_states[token]
        if getattr(self, "has_gate", True):
            h = self._apply_gate(self.gate_up_proj.linear(e, x))
        else:
            h = self.act_fn(self.up_proj.linear(e, x))
        out = self.down_proj.linear(e, h) * top_k_weights[token, position, None]
        final.index_add_(0, token, out.to(final.dtype))
    return final


def split_experts(model: nn.Module) -> int:
    """Split every routed-experts module of the decoder layers into `ExpertLinears` (in place; computed by
    `experts_forward`), so they are quantized, priced and exported like the layer's other linears. Returns how
    many modules it split (0: the model has none, or they are split already)."""
    split, layers = 0, decoder_layers(model)
    for _, layer in layers:
        for _, module in list(layer.named_modules()):
            for name in expert_weights(module):
                weight = module._parameters.pop(name)
                module.add_module(name, ExpertLinears(weight.detach()))
                split += 1
    if split or any(expert_holders(layer) for _, layer in layers):  # split now, or before (a copy)
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
        model.config._experts_implementation = EXPERTS_IMPLEMENTATION
    return split


def unquantized_matrices(model: nn.Module) -> tuple[int, int, list[str]]:
    """What a plan cannot quantize inside the decoder layers: the number of weights in ≥ 2-D tensors that are
    not a linear's or a splittable experts module's (an experts module `split_experts` cannot split, a router),
    the number of weights in all ≥ 2-D tensors of the decoder layers, and the kinds of modules that hold the
    former. Tensors shared between layers are counted once per layer (none of the supported models has any)."""
    linear, other, kinds = set(), 0, set()
    total = 0
    for _, layer in decoder_layers(model):
        linear |= {id(m.weight) for _, m in layer_linears(layer)}
        linear |= {id(m._parameters[k]) for m in layer.modules() for k in expert_weights(m)}  # not split yet
        for module in layer.modules():
            for t in module.parameters(recurse=False):
                if t.dim() < 2:
                    continue
                total += t.numel()
                if id(t) not in linear:
                    other += t.numel()
                    kinds.add(type(module).__name__)
    return other, total, sorted(kinds)


def resolve_targets(targets: tuple[str, ...], present: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The modules a plan's ``targets`` adapt in a layer whose linears are named ``present``: the default (Llama's
    seven names) means every linear of a layer that does not name its projections so; other targets are taken as
    they are (`Plan.check_model` refuses one the model lacks)."""
    targets = tuple(targets)
    if targets == DEFAULT_TARGET_MODULES and not set(targets) <= set(present):
        return tuple(dict.fromkeys(present))
    return targets
