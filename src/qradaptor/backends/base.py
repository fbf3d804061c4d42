"""The backend interface: quantize one linear layer at ``bits`` with groups of ``group_size`` weights,
predict its bytes and rebuild it from plain tensors; and the quantized-module interface,
:class:`QuantizedLinear`: every module a backend produces answers for itself (its bits, group size, the
bytes it holds, its state for saving, its dequantized weight), so nothing has to tag the model with the
backend that made it (:func:`is_quantized` finds them).

Grouping is the same for every backend (and HQQ's ``axis=1``): the weight matrix is read row-major in
runs of ``group_size`` consecutive weights, each run with one scale and one zero stored in the
metadata dtype (the compute dtype).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackendError


class _DequantMatmul(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen quantized ``W`` that autograd never keeps.

    ``F.linear(x, module.weight)`` would save the dequantized weight until backward (as much memory as the
    unquantized model). The weight is frozen, so backward only needs ``grad @ W`` for the input gradient:
    this saves nothing at all and dequantizes again from the packed codes in backward (HQQ's
    ``HQQMatmulNoCacheDeq`` and bitsandbytes' ``MatMul4Bit`` do the same).
    """

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        return F.linear(x, module.weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(ctx.module.weight)
        return grad_input, None, None


def dequant_linear(x: torch.Tensor, module: nn.Module, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ module.weight.T + bias`` where ``module.weight`` is dequantized on access and not saved for
    backward (the weight and bias are frozen: only ``x`` gets a gradient)."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return F.linear(x, module.weight, bias)
    return _DequantMatmul.apply(x, module, bias)


class QuantizedLinear(ABC):
    """What every quantized module, of every backend, answers for itself (mixed into the module class)."""

    #: the bit-width of its codes, and the number of consecutive weights sharing one scale and zero.
    bits: int
    group_size: int

    @abstractmethod
    def held_bytes(self) -> int:
        """Bytes actually held by the module's tensors (codes, scales, zeros and bias)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to rebuild the module (safetensors-compatible): what an export packs."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight the module computes with."""


def is_quantized(module: nn.Module) -> bool:
    """True for a quantized module of any backend."""
    return isinstance(module, QuantizedLinear)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class QuantBackend(ABC):
    name: ClassVar[str]
    #: bit-widths this backend can store.
    supported_bits: ClassVar[tuple[int, ...]]

    def __init__(self, compute_dtype: torch.dtype = torch.float32):
        # The dtype the layer computes in; scales and zeros are stored in it too.
        self.compute_dtype = compute_dtype

    # ---------------------------------------------------------------- checks
    def check_bits(self, bits: int) -> None:
        if bits not in self.supported_bits:
            raise BackendError(
                f"the {self.name} backend cannot store {bits}-bit weights",
                f"use one of {list(self.supported_bits)} (or 16 to leave a layer unquantized)"
                + ("" if self.name == "hqq" else ", or --backend hqq (it stores every bit-width 2..8)"),
            )

    def check_shape(self, out_features: int, in_features: int, group_size: int) -> None:
        if (out_features * in_features) % group_size:
            raise BackendError(
                f"a {out_features}x{in_features} weight cannot be split into groups of {group_size}",
                "choose a group_size that divides the number of weights of every quantized linear (e.g. 32 or 64)",
            )

    @property
    def metadata_bytes(self) -> int:
        return torch.finfo(self.compute_dtype).bits // 8

    # ---------------------------------------------------------------- the interface
    @abstractmethod
    def quantize(self, linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
        """A frozen module computing ``x @ dequant(W).T + b``; ``linear`` itself is left untouched."""

    @abstractmethod
    def weight_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        """Predicted bytes of the stored weight (codes + scales + zeros, bias excluded), from shapes alone."""

    #: the class of the modules this backend produces (a :class:`QuantizedLinear`).
    module_class: ClassVar[type]

    def is_quantized(self, module: nn.Module) -> bool:
        """True for modules this backend produced (:func:`is_quantized`: those of any backend)."""
        return isinstance(module, self.module_class)

    # The module answers for itself; these are kept as shorthands.
    def held_bytes(self, module: QuantizedLinear) -> int:
        return module.held_bytes()

    def dequantize(self, module: QuantizedLinear) -> torch.Tensor:
        return module.dequantize()

    def state(self, module: QuantizedLinear) -> dict[str, torch.Tensor]:
        return module.state()

    @abstractmethod
    def from_state(self, state: dict[str, torch.Tensor], name: str = "weight") -> nn.Module:
        """Rebuild a module from :meth:`state`'s tensors, refusing inconsistent ones with a message that
        names the offending tensor (``name`` is the module's name, e.g. ``model.layers.3.mlp.up_proj``)."""


class QuantCache:
    """Quantized layers kept in memory per ``(module name, bits, group size)``.

    The search applies many plans to the same model: each ``(layer, bits)`` pair is quantized once and
    later requests get a copy. One cache serves one source model and backend; a changed source
    weight (checked by shape and checksum) is an error rather than a silent stale hit.
    """

    def __init__(self, backend: QuantBackend):
        self.backend = backend
        self._modules: dict[tuple[str, int, int], tuple[tuple, nn.Module]] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _signature(linear: nn.Linear) -> tuple:
        w = linear.weight.detach()
        return (tuple(w.shape), w.dtype, float(w.double().sum()), float(w.double().abs().sum()))

    def get(self, name: str, linear: nn.Linear, bits: int, group_size: int,
            device: torch.device | None = None) -> nn.Module:
        """A copy of ``linear`` quantized (once per key) on ``device`` (default: where ``linear`` is; a key quantized on
        another device is copied there)."""
        key = (name, bits, group_size)
        sig = self._signature(linear)
        if key in self._modules:
            cached_sig, module = self._modules[key]
            if cached_sig != sig:
                raise RuntimeError(f"QuantCache: weights of {name} changed; use one cache per source model")
            self.hits += 1
        else:
            if device is not None and linear.weight.device != torch.device(device):
                linear = copy.deepcopy(linear).to(device)
            module = self.backend.quantize(linear, bits, group_size)
            self._modules[key] = (sig, module)
            self.misses += 1
        module = copy.deepcopy(module)
        return module.to(device) if device is not None else module

    def __len__(self) -> int:
        return len(self._modules)
