"""HQQ-native backend: HQQ's own ``HQQLinear`` with HQQ's own storage (half-quadratic quantization).

HQQ 0.2.8 packs 2- and 4-bit codes into uint8 exactly, 3-bit codes ten to an int32 (3.2 bits per
weight), 8-bit one per byte. 5 and 6 bits it would also store one code per byte, i.e. at the cost of
8 bits, so they are not offered here. Scales and zeros are kept unquantized in the compute dtype.
PEFT wraps ``HQQLinear`` as ``HqqLoraLinear``; gradients reach the adapters. The module is
:class:`NativeHQQLinear`, ``HQQLinear`` itself with the :class:`QuantizedLinear` answers added (so PEFT's
``isinstance(..., HQQLinear)`` dispatch and HQQ's own forward are unchanged).

The default ``hqq`` backend (``hqq.py``) uses the same quantizer with exact packing for every bit-width
2–8; this one is kept as the baseline benchmarks compare against ("HQQ's own 4-bit layer").
"""

from __future__ import annotations

import math

import torch
from hqq.core.quantize import HQQLinear
from torch import nn

from ..errors import BackendError
from .base import QuantBackend, QuantizedLinear, tensor_bytes

# Codes per storage element and that element's size in bytes, per bit-width (hqq.core.bitpack).
_PACKING = {2: (4, 1), 3: (10, 4), 4: (2, 1), 8: (1, 1)}


class NativeHQQLinear(HQQLinear, QuantizedLinear):
    """HQQ's ``HQQLinear`` (its storage, forward and PEFT wrapping) that describes itself."""

    @property
    def bits(self) -> int:  # type: ignore[override]
        return int(self.meta["nbits"])

    @property
    def group_size(self) -> int:  # type: ignore[override]
        return int(self.meta["group_size"])

    def held_bytes(self) -> int:
        return tensor_bytes(self.W_q, self.meta["scale"], self.meta["zero"], getattr(self, "bias", None))

    def dequantize(self) -> torch.Tensor:
        # HQQ's own dequantize (its forward calls it too), as the (out_features, in_features) matrix.
        return super().dequantize().reshape(self.out_features, self.in_features)

    def to(self, *args, **kwargs):
        # HQQLinear.to is a no-op in hqq 0.2.8: a cached layer asked for on another device (QuantCache.get) stayed
        # where it was quantized. nn.Module's .to goes through _apply below, as a parent's .to does. The codes are
        # integers and keep their dtype; scales and zeros keep the compute dtype fixed at quantization.
        return nn.Module.to(self, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # A parent's .to / .cuda / .cpu reaches this layer through _apply, not .to, and _apply moves the codes (a
        # Parameter) only: bring the scales and zeros (a dict) and the bias (a plain tensor) to where they went.
        super()._apply(fn, recurse)
        device = self.W_q.device
        self.meta = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.meta.items()}
        if getattr(self, "bias", None) is not None:
            self.bias = self.bias.to(device)
        self.device = device  # where hqq's own forward and dequantize put what they make
        return self

    def state(self) -> dict[str, torch.Tensor]:
        state = {
            "W_q": self.W_q.detach(),
            "scale": self.meta["scale"],
            "zero": self.meta["zero"],
            "shape": torch.tensor(list(self.meta["shape"]), dtype=torch.int64),
            "nbits": torch.tensor(self.meta["nbits"], dtype=torch.int64),
            "group_size": torch.tensor(self.meta["group_size"], dtype=torch.int64),
        }
        if getattr(self, "bias", None) is not None:
            state["bias"] = self.bias.detach()
        return state


class HQQNativeBackend(QuantBackend):
    name = "hqq-native"
    supported_bits = (2, 3, 4, 8)
    module_class = NativeHQQLinear

    def _config(self, bits: int, group_size: int) -> dict:
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)

    def quantize(self, linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
        self.check_bits(bits)
        self.check_shape(linear.out_features, linear.in_features, group_size)
        if group_size % 8:
            raise BackendError(f"HQQLinear needs a group size that is a multiple of 8, got {group_size}",
                               "choose a group_size such as 32 or 64, or --backend hqq (any group size)")
        rows = linear.out_features * linear.in_features // group_size
        per_element = _PACKING[bits][0]
        if bits != 3 and rows % per_element:
            # hqq's uint8 packers silently truncate when the group count is not a multiple.
            raise BackendError(
                f"{bits}-bit HQQ packing needs the number of groups ({rows}) to be a multiple of {per_element}",
                "choose a smaller group_size",
            )
        cfg = self._config(bits, group_size)
        # on the weight's device: hqq quantizes there and keeps the codes there
        module = NativeHQQLinear(None, cfg, compute_dtype=self.compute_dtype, device=str(linear.weight.device),
                                 initialize=False)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        # Quantize a copy: hqq may work in place on what it is given.
        weight = linear.weight.detach().clone().to(torch.float32)
        module.quantize(weight, **module.quant_config)  # hqq popped offload_meta from its copy
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone().to(self.compute_dtype)
        module.requires_grad_(False)
        return module

    def weight_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        self.check_bits(bits)
        rows = out_features * in_features // group_size
        per_element, element_bytes = _PACKING[bits]
        codes = math.ceil(rows / per_element) * group_size * element_bytes
        return codes + 2 * rows * self.metadata_bytes

    def from_state(self, state: dict[str, torch.Tensor], name: str = "weight") -> nn.Module:
        from hqq.core.quantize import Quantizer

        bits, group_size = int(state["nbits"]), int(state["group_size"])
        out_features, in_features = (int(v) for v in state["shape"])
        self.check_bits(bits)
        rows = out_features * in_features // group_size
        per_element, element_bytes = _PACKING[bits]
        expected = (math.ceil(rows / per_element), group_size)
        if tuple(state["W_q"].shape) != expected or state["W_q"].element_size() != element_bytes:
            raise BackendError(
                f"{name}.W_q: packed weight of shape {tuple(state['W_q'].shape)} does not match {bits}-bit "
                f"{out_features}x{in_features} (expected {expected})",
                "the file is corrupt or was written by another version; re-export it",
            )
        cfg = self._config(bits, group_size)
        module = NativeHQQLinear(None, cfg, compute_dtype=self.compute_dtype, device=str(state["W_q"].device),
                                 initialize=False)
        module.in_features, module.out_features = in_features, out_features
        packing = Quantizer.bit_to_packing[bits]
        module.W_q = state["W_q"].clone()
        module.meta = {
            "nbits": bits,
            "group_size": group_size,
            "shape": torch.Size([out_features, in_features]),
            "scale": state["scale"].to(self.compute_dtype).clone(),
            "zero": state["zero"].to(self.compute_dtype).clone(),
            "axis": 1,
            "packing": packing,
            "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
            "view_as_float": False,
            "quant_scale": False,
            "quant_zero": False,
            "compute_dtype": self.compute_dtype,
        }
        module.cuda(module.device)  # hqq's own finalisation: wraps W_q as a frozen Parameter on `device`
        if "bias" in state:
            module.bias = state["bias"].to(self.compute_dtype).clone()
        module.ready = True
        module.requires_grad_(False)
        return module
