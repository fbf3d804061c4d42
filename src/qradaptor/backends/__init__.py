"""Quantizer backends: one file each, all behind :class:`QuantBackend`.

``get_backend("hqq")`` is the default (HQQ's quantizer, exact bit packing for every bit-width 2–8);
``get_backend("hqq-native")`` is HQQ's own ``HQQLinear`` storage (2, 3, 4, 8 bits: the baseline);
``get_backend("reference")`` is plain PyTorch round-to-nearest, the exact reference for tests.
"""

from __future__ import annotations

from ..errors import BackendError
from .base import QuantBackend, QuantCache, QuantizedLinear, is_quantized

BACKENDS = ("hqq", "hqq-native", "reference")
DEFAULT_BACKEND = "hqq"


def get_backend(name: str = DEFAULT_BACKEND, **kwargs) -> QuantBackend:
    if name == "hqq":
        from .hqq import HQQBackend

        return HQQBackend(**kwargs)
    if name == "hqq-native":
        from .hqq_native import HQQNativeBackend

        return HQQNativeBackend(**kwargs)
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend(**kwargs)
    raise BackendError(f"unknown quantizer backend {name!r}", f"choose one of {list(BACKENDS)}")


def backend_for(model, name: str = DEFAULT_BACKEND) -> QuantBackend:
    """The backend that quantizes ``model``'s layers as `train` does: computing, and keeping scales, zeros and
    unquantized tensors, in the model's dtype. Pricing plans with it prices them as they will be stored."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return get_backend(name, **({"compute_dtype": dtype} if dtype is not None else {}))


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "QuantBackend", "QuantCache", "QuantizedLinear", "backend_for", "get_backend",
           "is_quantized"]
