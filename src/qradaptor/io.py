"""Crash-safe file writing: write to a temporary name beside the target, then rename.

A crash mid-write leaves at most a stray ``.tmp`` file, never a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class AtomicDirectory:
    """Build a directory under a temporary name and rename it into place only when complete.

    >>> with AtomicDirectory(out) as tmp:
    ...     write files into tmp
    An existing ``out`` is replaced only after the new one is complete.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)



def read_text(path: str | os.PathLike, error: type[Exception], what: str) -> str:
    """The text of a file the user handed us (``what``: "data file", "plan file", ...), as UTF-8.

    A UTF-8 byte-order mark is allowed. Another encoding, binary data or an unreadable file raises
    ``error(cause, fix)`` (a `QRAdaptorError` subclass) naming the file, instead of a traceback.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}", f"check that {path} is a readable file") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error(f"{what} {path} is UTF-16 text; qradaptor reads UTF-8",
                    f"convert it (iconv -f UTF-16 -t UTF-8 {path} > NEW) and pass NEW")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if b"\x00" in raw[:4096]:
            raise error(f"{what} {path} is binary, not text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                        f"pass the {what} itself, as UTF-8 text") from None
        raise error(f"{what} {path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                    f"convert it from its encoding (e.g. iconv -f LATIN1 -t UTF-8 {path} > NEW) and pass NEW") from None


def check_output_dir(path: str | os.PathLike, error: type[Exception], flag: str = "--out") -> Path:
    """Refuse, before any work, an output directory that cannot be made: a file, a path under a file, or
    a place this user cannot write. Returns the path; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file, not a directory", f"pass a directory path as {flag}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{flag} {path} cannot be created: {existing} is a file", f"pass a directory path as {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{flag} {path} cannot be written: {existing} is not writable by this user",
                    f"pass an {flag} directory you can write to")
    return path


class LockHeld(Exception):
    """`exclusive_lock` found the lock held; ``holder`` is what its holder recorded (pid, host, started, ...)."""

    def __init__(self, holder: dict):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, error: type[Exception], record: dict | None = None):
    """Hold an exclusive lock (flock) on ``path`` while the block runs, with who holds it written into the file
    (pid, host, start time and ``record``). Another holder raises `LockHeld` with its record; a directory that
    cannot be written raises ``error(cause, fix)``. The lock goes with the file or its process, so a crash never
    leaves a stale lock behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise error(f"cannot write to --out {path.parent}: {e.strerror or e}",
                    "pass a directory you can create and write to") from None
    with f:  # closing the file releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read())
            except ValueError:
                holder = {}
            raise LockHeld(holder if isinstance(holder, dict) else {}) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), **(record or {})}) + "\n")
        f.flush()
        yield
