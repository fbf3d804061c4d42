"""Which dtype a model computes in (``--dtype auto|float32|bfloat16``): bfloat16 where the device computes it fast,
float32 elsewhere.

bfloat16 halves the activations and the scales and zeros, and where the hardware has bf16 matmuls it is the faster
dtype (1.9× per training step on a CPU with AVX512-BF16, benchmarks/results/dtype.md). Where it has none, PyTorch's
bf16 matmul is a slow fallback: on an AVX2-only CPU ``grad @ W``, the product every backward through a frozen weight
takes, ran 40–200× slower than in float32 and a training step ~22× slower. So ``auto`` decides per device:

- CUDA: bfloat16 when the GPU has it natively (compute capability 8.0+; older ones emulate it), else float32;
- CPU with AVX512-BF16 or AMX: bfloat16; an x86 CPU without AVX-512 (AVX2 only): float32;
- anything else (AVX-512 without BF16, where oneDNN emulates it; ARM; ``ONEDNN_MAX_CPU_ISA`` capping what oneDNN
  uses): a micro-benchmark of the two products a training step is made of, in both dtypes, decides. It runs once
  per machine (well under a second where bf16 is fast, a few seconds where it is not) and is cached by CPU,
  PyTorch version, thread count and ``ONEDNN_MAX_CPU_ISA`` under the qradaptor cache directory.

``QRADAPTOR_DTYPE=float32|bfloat16`` in the environment is what ``auto`` means on this machine, whatever the device
says (for a machine the rules above misjudge, and for tests that must compute alike on every CPU).

The resolved dtype, never ``auto``, is what run records, study records and fingerprints hold, so a run resumed on
another machine keeps computing in the dtype it started in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger("qradaptor")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: What ``--dtype`` accepts: ``auto`` (the device's fast dtype) or a dtype by name.
DTYPE_CHOICES = ("auto", *DTYPES)
PROBE_FILE = "dtype-probe.json"
ENV = "QRADAPTOR_DTYPE"
#: bf16 is chosen by the probe when its products take at most this share of fp32's time (bf16 also halves memory)
_PROBE_RATIO = 1.0


@dataclass(frozen=True)
class DtypeChoice:
    """A device's compute dtype and why it was chosen (recorded in run.json)."""

    dtype: str  # "float32" or "bfloat16"
    reason: str
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> str:
    """``name`` as a dtype name: ``auto`` (or None) is `default_dtype` of ``device``; a name is checked.
    Raises `QRAdaptorError` naming the choices for anything else."""
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name is None or name == "auto":
        return default_dtype(device).dtype
    if name not in DTYPES:
        from .errors import QRAdaptorError

        raise QRAdaptorError(f"unknown dtype {name!r}", f"use --dtype {', '.join(DTYPE_CHOICES)}")
    return name


def default_dtype(device: torch.device | str | None = None) -> DtypeChoice:
    """The dtype ``device`` (None: `resolve_device`'s auto) computes fastest, with the reason."""
    from .device import resolve_device

    device = resolve_device(device)
    pinned = os.environ.get(ENV)
    if pinned:
        if pinned not in DTYPES:
            from .errors import QRAdaptorError

            raise QRAdaptorError(f"{ENV}={pinned!r} is not a dtype",
                                 f"set {ENV} to {' or '.join(DTYPES)}, or unset it to let the machine decide")
        return DtypeChoice(pinned, f"{ENV}={pinned} in the environment", str(device))
    if device.type == "cuda":
        # native bf16 only (compute capability 8.0+): older GPUs emulate it, which is what auto avoids
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return DtypeChoice("bfloat16", "this GPU computes in bfloat16", str(device))
        return DtypeChoice("float32", "this GPU has no native bfloat16", str(device))
    fast, why = cpu_bf16_capability()
    if fast is None:
        probe = probe_cpu()
        fast = probe["bfloat16_seconds"] <= _PROBE_RATIO * probe["float32_seconds"]
        why = (f"{why}: measured, bf16 products take {probe['bfloat16_seconds'] / probe['float32_seconds']:.2f}× "
               "fp32's time")
    return DtypeChoice("bfloat16" if fast else "float32", why, "cpu")


def _cpu_flag(name: str) -> bool | None:
    """``torch.cpu._is_<name>_supported()``; None where this PyTorch lacks that query."""
    query = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(query()) if query is not None else None
    except Exception:  # a private query: treat any failure as "unknown"
        return None


def cpu_bf16_capability() -> tuple[bool | None, str]:
    """Whether this CPU has fast bf16 matmuls as its instruction set tells: True, False, or None (unclear: measure)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return None, f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} may hide the CPU's bf16 instructions"
    if _cpu_flag("amx_tile") or _cpu_flag("avx512_bf16"):
        return True, "this CPU has native bf16 matmuls (AVX512-BF16 or AMX)"
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if x86 and _cpu_flag("avx512") is False and _cpu_flag("avx2") is not None:
        return False, "this CPU has no native bf16 matmuls (AVX2 at most), where PyTorch's bf16 fallback is slow"
    return None, "the CPU's bf16 speed is unclear from its instruction set"


def _machine_key() -> str:
    """What the probe's answer depends on: the CPU, PyTorch, its threads and oneDNN's ISA cap."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        cpu += "".join(sorted(set(lines)))
    except OSError:
        pass
    parts = (cpu, torch.__version__, str(torch.get_num_threads()), os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _time_products(dtype: torch.dtype, repeats: int = 3, enough: float = float("inf")) -> float:
    """Best time of a training step's two products through a frozen weight: ``x @ W.T`` and ``grad @ W``;
    a time above ``enough`` ends the measurement at once (a slow fallback need not be timed four times)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g).to(dtype)
    w = torch.randn(2048, 1024, generator=g).to(dtype)
    grad = torch.randn(256, 2048, generator=g).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up the kernels
        start = time.perf_counter()
        x @ w.T
        grad @ w
        best = min(best, time.perf_counter() - start)
        if best > enough:
            break
    return best


@functools.cache
def probe_cpu() -> dict:
    """Seconds of a training step's products in bf16 and fp32 on this CPU: measured once per machine, then read
    from the cache (``dtype-probe.json`` under the qradaptor cache directory)."""
    from .io import atomic_write_json
    from .models import cache_dir

    key = _machine_key()
    path = cache_dir() / PROBE_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and all(isinstance(entry.get(k), float) and entry[k] > 0
                                       for k in ("bfloat16_seconds", "float32_seconds")):
        return entry
    log.info("measuring this CPU's bfloat16 and float32 matmul speed once, to choose the compute dtype")
    fp32 = _time_products(torch.float32)
    entry = {"bfloat16_seconds": _time_products(torch.bfloat16, enough=4 * fp32), "float32_seconds": fp32,
             "torch": torch.__version__, "threads": torch.get_num_threads(),
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        atomic_write_json(path, {**cached, key: entry})
    except OSError as e:  # an unwritable cache only costs the probe again next time
        log.warning("could not cache the dtype probe in %s (%s)", path, e.strerror or e)
    return entry
