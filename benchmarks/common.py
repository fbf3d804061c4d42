"""Shared by the benchmarks: the machine and package versions to record, and writing results."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "peft", "hqq", "optuna", "qradaptor")


def environment() -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        **cpu(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
    }


def cpu() -> dict:
    """The CPU timings depend on: its model, PyTorch's kernel level (``AVX2``, ``AVX512``), whether it has native
    bf16 matmuls, oneDNN's cap if one is set, and the dtype ``--dtype auto`` chose on it."""
    import torch

    from qradaptor.precision import cpu_bf16_capability, default_dtype

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    native, _ = cpu_bf16_capability()
    choice = default_dtype("cpu")
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "auto_dtype": choice.dtype,
            "auto_dtype_reason": choice.reason}


def describe_cpu(env: dict) -> str:
    """One line for a results table's header: which CPU, at which kernel level, with or without native bf16."""
    bf16 = {True: "native bf16 matmuls", False: "no native bf16 matmuls", None: "bf16 speed measured"}[
        env.get("native_bf16")]
    cap = f", oneDNN capped at {env['onednn_max_cpu_isa']}" if env.get("onednn_max_cpu_isa") else ""
    return (f"{env.get('cpu', '?')}, {env.get('cpus', '?')} cores, PyTorch {env.get('cpu_capability', '?')} kernels, "
            f"{bf16}{cap}; `--dtype auto` → {env.get('auto_dtype', '?')}")


def write_results(name: str, payload: dict, markdown: str, directory: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``NAME.json`` and ``NAME.md`` into ``directory`` (default: results/; atomically, via qradaptor.io)."""
    from qradaptor.io import atomic_write_json, atomic_write_text

    json_path = atomic_write_json(Path(directory) / f"{name}.json", payload)
    md_path = atomic_write_text(Path(directory) / f"{name}.md", markdown)
    return json_path, md_path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    # a cell's own bars (a plan's `describe`) escaped, or they would split it
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def child_result(path: Path, args: list[str], what: str, env: dict | None = None) -> dict:
    """The JSON a case's child process printed last, kept at ``path``: the child runs only when ``path`` is not
    there yet (so a benchmark resumes), and a failed child stops the benchmark with its error."""
    import subprocess

    if not path.is_file():
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(proc.stdout.strip().splitlines()[-1])
        tmp.replace(path)
    return json.loads(path.read_text())


def vm_bytes(field: str) -> int:
    """This process's ``VmRSS`` / ``VmHWM`` (peak) in bytes; the memory benchmarks measure on Linux only."""
    from qradaptor.device import process_memory

    value = process_memory(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status: the memory benchmarks measure on Linux")
    return value
