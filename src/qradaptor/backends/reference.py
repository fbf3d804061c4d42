"""Reference backend: plain-PyTorch round-to-nearest with a min–max scale and zero per group.

It is the exact, readable statement of what a quantized layer computes, used to check the rest of the
pipeline. It accepts every bit-width 2–8 and stores codes one per byte (no bit packing, by choice: the
reference stays the plainest statement of the math), so its memory is 8 bits per weight plus metadata
whatever the bit-width; use it for correctness, not to save memory.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BackendError
from .base import QuantBackend, QuantizedLinear, dequant_linear, tensor_bytes


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int):
    """Asymmetric min–max quantization of row-major runs of ``group_size`` weights.

    Returns uint8 codes (same shape as ``weight``) and per-group ``scale``/``zero`` of shape
    ``(n_groups, 1)`` such that ``weight ≈ (codes - zero) * scale``.
    """
    w = weight.detach().to(torch.float32).reshape(-1, group_size)
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = (-lo / scale).round()
    codes = (w / scale + zero).round().clamp(0, levels).to(torch.uint8)
    return codes.reshape(weight.shape), scale, zero


class FakeQuantLinear(QuantizedLinear, nn.Linear):
    """A frozen linear that keeps integer codes and dequantizes them on every forward.

    It subclasses ``nn.Linear`` (without a stored ``weight`` parameter) so PEFT wraps it with its
    ordinary LoRA ``Linear``; ``weight`` is the dequantized matrix, computed on access.
    """

    def __init__(self, codes, scale, zero, bias, bits: int, group_size: int, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("zero", zero.to(compute_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = (self.codes.reshape(-1, self.group_size).to(self.compute_dtype) - self.zero) * self.scale
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_linear(x.to(self.compute_dtype), self, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"

    def held_bytes(self) -> int:
        return tensor_bytes(self.codes, self.scale, self.zero, self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight.detach()

    def state(self) -> dict[str, torch.Tensor]:
        state = {
            "codes": self.codes,
            "scale": self.scale,
            "zero": self.zero,
            "nbits": torch.tensor(self.bits),
            "group_size": torch.tensor(self.group_size),
        }
        if self.bias is not None:
            state["bias"] = self.bias.detach()
        return state


class ReferenceBackend(QuantBackend):
    name = "reference"
    supported_bits = (2, 3, 4, 5, 6, 7, 8)
    module_class = FakeQuantLinear

    def quantize(self, linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
        self.check_bits(bits)
        self.check_shape(linear.out_features, linear.in_features, group_size)
        codes, scale, zero = quantize_groups(linear.weight, bits, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return FakeQuantLinear(codes, scale, zero, bias, bits, group_size, self.compute_dtype)

    def weight_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        self.check_bits(bits)
        n = out_features * in_features
        return n + 2 * (n // group_size) * self.metadata_bytes

    def from_state(self, state: dict[str, torch.Tensor], name: str = "weight") -> nn.Module:
        bits, group_size = int(state["nbits"]), int(state["group_size"])
        self.check_bits(bits)
        codes = state["codes"]
        n_groups = codes.numel() // group_size
        if codes.dtype != torch.uint8 or codes.dim() != 2 or tuple(state["scale"].shape) != (n_groups, 1) or int(codes.max()) >= 2**bits:
            raise BackendError(
                f"{name}.codes: stored codes {tuple(codes.shape)} {codes.dtype} do not match {bits}-bit groups of {group_size}",
                "the file is corrupt or was written by another version; re-export it",
            )
        return FakeQuantLinear(codes.clone(), state["scale"].clone(), state["zero"].clone(), state.get("bias"),
                               bits, group_size, self.compute_dtype)
