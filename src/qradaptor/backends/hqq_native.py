"""HQQ-native backend: HQQ's own ``HQQLinear`` with HQQ's own storage (half-quadratic quantization).

HQQ 0.2.8 packs 2- and 4-bit codes into uint8 exactly, 3-bit codes ten to an int32 (3.2 bits per
weight), 8-bit one per byte. 5 and 6 bits it would also store one code per byte, i.e. at the cost of
8 bits, so they are not offered here. Scales and zeros are kept unquantized in the compute dtype.
PEFT wraps ``HQQLinear`` as ``HqqLoraLinear``; gradients reach the adapters.

The default ``hqq`` backend (``hqq.py``) uses the same quantizer with exact packing for every bit-width
2–8; this one is kept as the baseline benchmarks compare against ("HQQ's own 4-bit layer").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import BackendError
from .base import QuantBackend

# Codes per storage element and that element's size in bytes, per bit-width (hqq.core.bitpack).
_PACKING = {2: (4, 1), 3: (10, 4), 4: (2, 1), 8: (1, 1)}


class HQQNativeBackend(QuantBackend):
    name = "hqq-native"
    supported_bits = (2, 3, 4, 8)

    def _config(self, bits: int, group_size: int) -> dict:
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)

    def quantize(self, linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
        from hqq.core.quantize import HQQLinear

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
        module = HQQLinear(None, cfg, compute_dtype=self.compute_dtype, device="cpu", initialize=False)
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

    def held_bytes(self, module: nn.Module) -> int:
        total = module.W_q.numel() * module.W_q.element_size()
        for key in ("scale", "zero"):
            t = module.meta[key]
            total += t.numel() * t.element_size()
        if getattr(module, "bias", None) is not None:
            total += module.bias.numel() * module.bias.element_size()
        return total

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.dequantize().reshape(module.out_features, module.in_features)

    def is_quantized(self, module: nn.Module) -> bool:
        from hqq.core.quantize import HQQLinear

        return isinstance(module, HQQLinear)

    def state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        state = {
            "W_q": module.W_q.detach(),
            "scale": module.meta["scale"],
            "zero": module.meta["zero"],
            "shape": torch.tensor(list(module.meta["shape"]), dtype=torch.int64),
            "nbits": torch.tensor(module.meta["nbits"], dtype=torch.int64),
            "group_size": torch.tensor(module.meta["group_size"], dtype=torch.int64),
        }
        if getattr(module, "bias", None) is not None:
            state["bias"] = module.bias.detach()
        return state

    def from_state(self, state: dict[str, torch.Tensor], name: str = "weight") -> nn.Module:
        from hqq.core.quantize import HQQLinear, Quantizer

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
        module = HQQLinear(None, cfg, compute_dtype=self.compute_dtype, device="cpu", initialize=False)
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
