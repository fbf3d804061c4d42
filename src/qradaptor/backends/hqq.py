"""HQQ backend (the default): HQQ's quantizer, exact bit packing for every bit-width 2–8.

HQQ (half-quadratic quantization, the ``hqq`` package) computes the codes, scales and zeros exactly as
its own ``HQQLinear`` would (same settings: axis 1, optimized, zero rounded at 4 bits). Storage is ours
(:mod:`.packing`): ``n`` codes of ``b`` bits take ``ceil(n·b/8)`` bytes, so 3 bits cost 3 bits per weight
(HQQ: 3.2) and 5, 6 and 7 bits cost 5, 6 and 7 (HQQ stores 5 and 6 one code per byte and has no 7).
Scales and zeros are kept unquantized in the compute dtype (one each per group).

The module, :class:`PackedLinear`, subclasses ``nn.Linear`` with ``weight`` computed on access (unpack,
then ``(code - zero) · scale``), so PEFT wraps it with its ordinary LoRA ``Linear`` and gradients reach
the adapters. Pack and unpack are plain PyTorch and run wherever the tensors live (CPU or CUDA).
HQQ's own storage remains available as the ``hqq-native`` backend (``hqq_native.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BackendError
from .base import QuantBackend, QuantizedLinear, dequant_linear, tensor_bytes
from .packing import PACKABLE_BITS, pack, packed_bytes, unpack


def hqq_quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's codes (uint8, ``(n_groups, group_size)``), scale and zero (``(n_groups, 1)``, fp32) for ``weight``,
    such that ``weight ≈ (codes - zero) * scale`` group by group (row-major runs of ``group_size`` weights).
    The settings are those of HQQ's own ``BaseQuantizeConfig(nbits, group_size, axis=1)``."""
    from hqq.core.quantize import Quantizer

    w = weight.detach().clone().to(torch.float32)  # a copy: hqq may work in place on what it is given
    if bits not in Quantizer.SUPPORTED_BITS:  # hqq 0.2.8 has no 7-bit setting
        return _hqq_quantize_unlisted(w, bits, group_size)
    codes, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group_size, optimize=True,
                                     round_zero=bits == 4, axis=1, bitpack=False, device=str(w.device))
    return codes.reshape(-1, group_size).to(torch.uint8), meta["scale"].float(), meta["zero"].float()


def _hqq_quantize_unlisted(w: torch.Tensor, bits: int, group_size: int):
    """The steps of ``Quantizer.quantize`` (min–max start, then HQQ's own proximal optimizer) for a bit-width
    hqq does not list; test_packing checks it reproduces ``Quantizer.quantize`` exactly at 5 and 6 bits."""
    from hqq.core.quantize import Quantizer

    w = w.reshape(-1, group_size)
    lo, hi = w.min(dim=1, keepdim=True)[0], w.max(dim=1, keepdim=True)[0]
    max_v = 2**bits - 1
    denom = hi - lo
    inv_scale = max_v / denom
    inv_scale = torch.where(denom.abs() <= 1e-4, torch.full_like(inv_scale, 1.0), inv_scale).clamp(max=2e4)
    zero = -lo * inv_scale
    codes, inv_scale, zero = Quantizer.optimize_weights(tensor=w, scale=inv_scale, zero=zero, min_max=[0, max_v],
                                                        axis=1, device=str(w.device))
    return codes.to(torch.uint8), (1.0 / inv_scale).float(), zero.float()


class PackedLinear(QuantizedLinear, nn.Linear):
    """A frozen linear holding bit-packed codes (``packed``, uint8) with one scale and one zero per group.

    It subclasses ``nn.Linear`` without a stored ``weight`` parameter: ``weight`` is dequantized on every
    access, so PEFT wraps it with its ordinary LoRA ``Linear``.
    """

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None, *,
                 out_features: int, in_features: int, bits: int, group_size: int, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale.to(compute_dtype))
        self.register_buffer("zero", zero.to(compute_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, ``(out_features, in_features)`` uint8."""
        return unpack(self.packed, self.out_features * self.in_features, self.bits).view(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = self.codes().view(-1, self.group_size).to(self.compute_dtype)  # a fresh tensor: safe to update in place
        return w.sub_(self.zero).mul_(self.scale).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_linear(x.to(self.compute_dtype), self, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")

    def held_bytes(self) -> int:
        return tensor_bytes(self.packed, self.scale, self.zero, self.bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight.detach()

    def state(self) -> dict[str, torch.Tensor]:
        state = {
            "packed": self.packed,
            "scale": self.scale,
            "zero": self.zero,
            "shape": torch.tensor([self.out_features, self.in_features], dtype=torch.int64),
            "nbits": torch.tensor(self.bits, dtype=torch.int64),
            "group_size": torch.tensor(self.group_size, dtype=torch.int64),
        }
        if self.bias is not None:
            state["bias"] = self.bias.detach()
        return state


class HQQBackend(QuantBackend):
    name = "hqq"
    supported_bits = PACKABLE_BITS  # 2..8
    module_class = PackedLinear

    def quantize(self, linear: nn.Linear, bits: int, group_size: int) -> nn.Module:
        self.check_bits(bits)
        self.check_shape(linear.out_features, linear.in_features, group_size)
        codes, scale, zero = hqq_quantize(linear.weight, bits, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return PackedLinear(pack(codes, bits), scale, zero, bias, out_features=linear.out_features,
                            in_features=linear.in_features, bits=bits, group_size=group_size,
                            compute_dtype=self.compute_dtype)

    def weight_bytes(self, out_features: int, in_features: int, bits: int, group_size: int) -> int:
        self.check_bits(bits)
        n = out_features * in_features
        return packed_bytes(n, bits) + 2 * (n // group_size) * self.metadata_bytes

    def from_state(self, state: dict[str, torch.Tensor], name: str = "weight") -> nn.Module:
        fix = "the file is corrupt or was written by another version; re-export it"
        missing = sorted({"packed", "scale", "zero", "shape", "nbits", "group_size"} - set(state))
        if missing:
            raise BackendError(f"{name}: the stored state lacks {missing}", fix)
        bits, group_size = int(state["nbits"]), int(state["group_size"])
        self.check_bits(bits)
        shape = state["shape"]
        if shape.numel() != 2 or group_size <= 0:
            raise BackendError(f"{name}.shape: stored shape {shape.tolist()} / group size {group_size} are not a "
                               f"weight matrix split into groups", fix)
        out_features, in_features = (int(v) for v in shape)
        n = out_features * in_features
        if out_features <= 0 or in_features <= 0 or n % group_size:
            raise BackendError(f"{name}.shape: a {out_features}x{in_features} weight cannot be split into groups of "
                               f"{group_size}", fix)
        packed = state["packed"]
        expected = packed_bytes(n, bits)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
            raise BackendError(
                f"{name}.packed: stored {tuple(packed.shape)} {packed.dtype} ({packed.numel() * packed.element_size()} "
                f"bytes), but {bits}-bit codes of a {out_features}x{in_features} weight take a flat uint8 vector of "
                f"{expected} bytes", fix)
        for key in ("scale", "zero"):
            t = state[key]
            if not t.is_floating_point() or tuple(t.shape) != (n // group_size, 1):
                raise BackendError(f"{name}.{key}: stored {tuple(t.shape)} {t.dtype}, expected "
                                   f"({n // group_size}, 1) floating point (one per group of {group_size})", fix)
        bias = state.get("bias")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise BackendError(f"{name}.bias: stored {tuple(bias.shape)}, expected ({out_features},)", fix)
        return PackedLinear(packed.clone(), state["scale"].clone(), state["zero"].clone(),
                            None if bias is None else bias.clone(), out_features=out_features,
                            in_features=in_features, bits=bits, group_size=group_size,
                            compute_dtype=self.compute_dtype)
