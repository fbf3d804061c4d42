"""Where a model computes (``--device auto|cpu|cuda``) and what a phase on it peaks at.

The stages compute wherever the model they are given lives (they move their token blocks there); the
commands resolve ``--device`` and quantize each linear on that device as it is made, so a GPU never holds the
dense model. Peak memory is what limits a run there: on CUDA the allocator's high-water mark
(``torch.cuda.max_memory_allocated``), on the CPU the process's peak resident memory (``VmHWM``, which
``/proc/self/clear_refs`` resets on Linux).
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
_FIX = "use --device cpu (or auto, which picks the GPU only when PyTorch sees one)"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None): the first CUDA GPU when PyTorch sees one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``."""
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}", "use --device auto, cpu or cuda (cuda:N for GPU N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r} is not supported (qradaptor runs on the CPU and on CUDA GPUs)",
                          "use --device auto, cpu or cuda")
    if not torch.cuda.is_available():
        why = ("this PyTorch is a CPU-only build" if torch.version.cuda is None
               else "PyTorch was built with CUDA but finds no usable GPU or driver")
        raise DeviceError(f"--device {text} asks for a CUDA GPU, but {why}", _FIX)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {text}: there is no GPU {device.index} (PyTorch sees "
                          f"{torch.cuda.device_count()})", f"use --device cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first tensor (the CPU for a model without any)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@functools.cache
def cpu_allocator() -> str:
    """How this process's PyTorch allocates large CPU tensors: ``"huge-pages"`` when it takes its huge-page path
    (``THP_MEM_ALLOC_ENABLE``, which qradaptor turns on when imported before PyTorch's first allocation) on a
    kernel with transparent huge pages, else ``"glibc"``. Seen from a fresh 4 MiB tensor: that path advises its
    blocks as huge pages, which the kernel lists among the mapping's flags (``hg`` in /proc/self/smaps)."""
    probe = torch.empty(2**22, dtype=torch.uint8)
    address = probe.data_ptr()
    try:
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return "glibc"
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:  # not Linux
        return "glibc"
    inside = False
    for line in smaps.splitlines():
        mapping = _MAPPING.match(line)
        if mapping:
            inside = int(mapping[1], 16) <= address < int(mapping[2], 16)
        elif inside and line.startswith("VmFlags:"):
            return "huge-pages" if "hg" in line.split()[1:] else "glibc"
    return "glibc"


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def process_memory(field: str) -> int | None:
    """Bytes of a memory field of this process from /proc/self/status (``VmRSS``, ``VmHWM``: the peak); None where
    there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except OSError:
        pass
    return None


class PeakMemory:
    """The peak memory of a phase on ``device``: `start` resets the high-water mark, `bytes` reads it.

    On CUDA, bytes allocated by PyTorch on that GPU (the CUDA context and the caching allocator's spare
    blocks are not counted). On the CPU, the process's peak resident memory; where the mark cannot be reset
    (not Linux, or ``/proc/self/clear_refs`` not writable) it includes what came before the phase, and
    `reset` says so.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.reset = False

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return process_memory("VmHWM")

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"peak memory allocated on {self.device}"
        return "peak resident memory of the process" + ("" if self.reset else " (including what came before)")
