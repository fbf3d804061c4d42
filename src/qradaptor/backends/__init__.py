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


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "QuantBackend", "QuantCache", "QuantizedLinear", "get_backend", "is_quantized"]
