"""Compute threads of qradaptor processes that share one machine (``--threads auto|all|N``).

PyTorch gives every process as many compute threads as the machine has cores. Two such processes do not split
the cores between them: their threads wait for each other's (spinning, then sleeping) and each process runs far
slower than alone — on 2 cores, 4.1–9.8× per process for profile, search and run, where sharing the cores
costs 1.2–1.6× (benchmarks/results/contention.md). With ``auto`` (the CLI's default), each qradaptor process registers in a
per-user directory of this machine and computes with its share of the cores: the cores divided among the live
registered processes, re-counted at the points where a stage may change it (between training steps, profile
probes and evaluation batches, at most once a second), so a process takes the cores back when the others end.

``all`` keeps PyTorch's own count (every core, whatever else runs); a number fixes the thread count, and the
``auto`` processes share out what the fixed ones leave. ``QRADAPTOR_THREADS`` in the environment is the default
of ``--threads``. Processes that are not qradaptor's are not counted: give ``--threads`` where the machine also
runs other heavy work. The library does nothing of this unless `share_cores` is called.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import QRAdaptorError

log = logging.getLogger("qradaptor")

ENV = "QRADAPTOR_THREADS"
#: where the registry lives (default: a per-user directory under the system's temporary directory)
RUNTIME_ENV = "QRADAPTOR_RUNTIME_DIR"
CHOICES = ("auto", "all")
#: the shortest time between two counts of the live processes
RECOUNT_SECONDS = 1.0


def _torch():
    import torch  # not at import: the CLI parses --threads before it loads PyTorch

    return torch


def parse_threads(text: str | int) -> str | int:
    """``auto``, ``all`` or a positive thread count; ValueError otherwise (argparse turns it into a usage error)."""
    value = str(text).strip().lower()
    if value in CHOICES:
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"--threads takes auto, all or a positive number, not {text!r}")


def default_threads() -> str | int:
    """``$QRADAPTOR_THREADS`` when set, else ``auto``."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return "auto"
    try:
        return parse_threads(text)
    except ValueError:
        raise QRAdaptorError(f"{ENV}={text!r} is not a thread setting",
                             f"set {ENV} to auto, all or a positive number, or unset it") from None


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def registry_dir() -> Path:
    """The directory of this user's live qradaptor processes on this machine."""
    if os.environ.get(RUNTIME_ENV):
        return Path(os.environ[RUNTIME_ENV])
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"qradaptor-{user}" / "processes"


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), to tell a live process from
    a later one reusing its pid; None where there is no /proc or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


def _alive(entry: dict) -> bool:
    pid = entry["pid"]
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process under our pid: ours ended
        return False
    except OSError:
        return False
    started = _started(pid)
    return started is None or entry.get("started") in (None, started)


@dataclass
class Process:
    pid: int
    started: str | None
    threads: int | None  # fixed (--threads N or all), None: its share

    def to_dict(self) -> dict:
        return {"pid": self.pid, "started": self.started, "threads": self.threads}


def _well_formed(entry) -> bool:
    return (isinstance(entry, dict) and type(entry.get("pid")) is int
            and (entry.get("started") is None or (isinstance(entry["started"], str) and entry["started"].isdigit()))
            and (entry.get("threads") is None or (type(entry["threads"]) is int and entry["threads"] > 0)))


def live_processes(directory: Path | None = None) -> list[Process]:
    """The registered processes still running, oldest first (entries of ended ones are removed)."""
    directory = directory or registry_dir()
    found = []
    try:
        paths = list(directory.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written, or not ours: skipped, never deleted
        if not _well_formed(entry):
            continue  # not ours: skipped, never deleted
        if _alive(entry):
            found.append(Process(int(entry["pid"]), entry.get("started"), entry.get("threads")))
        else:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda p: (p.started is None, int(p.started or 0), p.pid))


def share(processes: list[Process], me: int, cores: int) -> int:
    """Threads for process ``me`` (its pid) among ``processes``: fixed ones keep theirs; the others split what is
    left (the oldest take the remainder), at least one thread each."""
    fixed = sum(p.threads for p in processes if p.threads)
    sharing = [p.pid for p in processes if not p.threads]
    if me not in sharing:
        sharing.append(me)
    left = max(cores - fixed, 0)
    base, extra = divmod(left, len(sharing))
    return max(1, base + (1 if sharing.index(me) < extra else 0))


class _Share:
    def __init__(self, threads: str | int, directory: Path):
        self.cores = machine_cores()
        self.fixed = {"auto": None, "all": self.cores}.get(threads, threads)
        self.directory = directory
        self.pid = os.getpid()
        self.path = directory / f"{self.pid}.json"
        self.last = 0.0
        self.warned = False
        self.threads = _torch().get_num_threads()

    def register(self) -> None:
        from .io import atomic_write_json

        try:
            atomic_write_json(self.path, Process(self.pid, _started(self.pid), self.fixed).to_dict())
        except OSError as e:  # a read-only temp dir must not stop a run: no sharing, said once
            log.warning(f"qradaptor: cannot register in {self.directory} ({e}); computing with "
                        f"{self.threads} threads whatever else runs (set --threads)")
            self.path = None
        atexit.register(self.unregister)

    def unregister(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def recount(self) -> int:
        self.last = time.monotonic()
        processes = live_processes(self.directory) if self.path is not None else []
        wanted = self.fixed or share(processes, self.pid, self.cores)
        if wanted != self.threads:
            _torch().set_num_threads(wanted)
            self.threads = wanted
        total = sum(p.threads or 1 for p in processes if p.pid != self.pid) + wanted
        if total > self.cores and not self.warned and len(processes) > 1:
            self.warned = True
            log.warning(f"qradaptor: {len(processes)} qradaptor processes want {total} compute threads on "
                        f"{self.cores} cores: each runs slower than its share of the machine would suggest; run at "
                        f"most {self.cores} at once (or give each --threads)")
        return wanted


_current: _Share | None = None


def share_cores(threads: str | int = "auto", *, directory: str | os.PathLike | None = None) -> int:
    """Make this process compute with ``threads``: ``auto`` (its share of the machine's cores among the live
    qradaptor processes, re-counted as they come and go), ``all`` (every core) or a number. Returns the threads now.
    Calling it again replaces the setting."""
    global _current
    threads = parse_threads(threads)
    if _current is not None:
        _current.unregister()
    _current = _Share(threads, Path(directory) if directory else registry_dir())
    _current.register()
    return _current.recount()


def rebalance() -> None:
    """Re-count the live processes and adjust this one's threads: called by the stages between units of work;
    does nothing unless `share_cores` was called, and at most once every `RECOUNT_SECONDS`."""
    if _current is not None and time.monotonic() - _current.last >= RECOUNT_SECONDS:
        _current.recount()


def stop_sharing() -> None:
    """Leave the registry and stop adjusting (the threads stay as they are)."""
    global _current
    if _current is not None:
        _current.unregister()
        _current = None
