"""Where a search keeps its state: Optuna RDB storage (with heartbeats), the study's config fingerprint,
the --out directory's marker and lock, and the liveness of the processes that hold trials and leases.
Only Optuna's public API: trials are addressed by ids from ``BaseStorage`` (see ``trial_id``)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..architecture import DEFAULT_TARGET_MODULES
from ..io import LockHeld, exclusive_lock
from ..rundir import DEFAULT_START_TOKENS
from .config import CONFIG_ATTR, MARKER, SEARCH_FILES, Fidelity, SearchConfig, SearchError

log = logging.getLogger("qradaptor")


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats (a killed worker's trial is retried), or a clear error."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=int(os.environ.get("QRADAPTOR_HEARTBEAT", "30")),
                grace_period=int(os.environ.get("QRADAPTOR_GRACE", "90")),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
            )
    except (SQLAlchemyError, ImportError, ValueError, OSError) as e:
        raise SearchError(f"cannot open the study storage {redact(url)}: {str(e).splitlines()[0][:300]}",
                          "check the URL, that the database server is running and reachable, and the driver "
                          "(PostgreSQL needs `pip install psycopg2-binary`)") from None


def recorded_config(storage, study: str) -> dict | None:
    """The settings ``study`` recorded when it began (`SearchConfig.to_dict` and more), or None where there is no
    such study. ``storage``: an opened storage, or its URL (a SQLite file not yet made is not created)."""
    import optuna

    if isinstance(storage, str) and storage.startswith("sqlite:///") and not Path(
            storage.removeprefix("sqlite:///")).is_file():
        return None
    try:
        summaries = optuna.get_all_study_summaries(open_storage(storage) if isinstance(storage, str) else storage)
    except Exception:  # noqa: BLE001 - an unreadable storage is reported when the search opens it
        return None
    config = next((s.user_attrs.get(CONFIG_ATTR) for s in summaries if s.study_name == study), None)
    return config if isinstance(config, dict) else None


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _config_fingerprint(config: dict) -> dict:
    """What must match for a study to be continued: model, budget, space, settings (not trial counts)."""
    keep = ("model_fingerprint", "budget_bytes", "bits", "ranks", "group_size", "backend", "seq_len", "cheap",
            "full", "seed", "data", "alpha", "rank_value", "sampler", "budget_on", "train_batch_size",
            "data_fingerprint", "dtype", "target_modules", "adapter_init", "start_tokens", "dora",
            "expert_adapters", "genes", "group_sizes", "recovered_bits")
    out = {k: config.get(k) for k in keep}
    out["dtype"] = out["dtype"] or "float32"  # a study from before it was recorded searched in float32
    out["target_modules"] = list(out["target_modules"] or DEFAULT_TARGET_MODULES)  # ... and adapted the default
    out["adapter_init"] = out["adapter_init"] or "zero"  # ... and started its adapters at zero
    out["start_tokens"] = out["start_tokens"] or DEFAULT_START_TOKENS  # ... on this many tokens when it fitted them
    out["dora"] = bool(out["dora"])  # ... with LoRA adapters
    out["expert_adapters"] = bool(out["expert_adapters"])  # ... none on routed experts
    out["genes"] = out["genes"] or "layer"  # ... and chose per layer
    out["group_sizes"] = list(out["group_sizes"] or [])  # ... with one group size
    out["recovered_bits"] = out["recovered_bits"] or 8  # ... and a prior that charged every layer's whole KL
    for k in ("cheap", "full"):  # with the defaults of fields added since (a study made before has none)
        if isinstance(out[k], dict):
            out[k] = asdict(Fidelity(**out[k]))
    return out


def search_data_fingerprint(data: str | None, config: SearchConfig) -> str:
    """The contents of what the fine-tunes train and are scored on (train and validation splits), so that a
    resumed search refuses data replaced at the same path instead of mixing trials scored on both."""
    from ..data import data_fingerprint

    parts = [data_fingerprint(data, split, config.seq_len, seed=config.seed) for split in ("train", "validation")]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def trial_id(storage, study, trial) -> int:
    """The storage's id of ``trial`` (a FrozenTrial of ``study``), through the public storage API: Optuna keeps
    a trial's id in private fields, but a study's name and a trial's number identify it too."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                           trial.number)


def grace_seconds(storage) -> int:
    """How long after its last heartbeat a trial (or a coordinator lease) counts as its process's death."""
    return storage.grace_period or 2 * (storage.get_heartbeat_interval() or 30)


def _whoami() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(worker: str) -> bool:
    """Whether ``worker`` ("host:pid", as `_whoami` wrote it) is a process of this machine that has ended."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # a killed process its parent has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _fail(storage, trial_id: int, value: float | None = None) -> bool:
    """Fail a trial (or complete it with ``value``) unless another process finished it; whether this call did."""
    import optuna
    from optuna.trial import TrialState

    try:
        if value is not None:
            return storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _heartbeat(storage, trial_id: int, stop: threading.Event) -> None:
    interval = storage.get_heartbeat_interval() or 30
    while True:
        try:
            storage.record_heartbeat(trial_id)
        except Exception as e:  # noqa: BLE001 - a missed beat only risks the lease; the search goes on
            log.warning("search: heartbeat failed (%s)", e)
        if stop.wait(interval):
            return


def check_search_dir(out: Path) -> None:
    """Refuse, before anything is written, an --out that is (or lies under) a file, or a non-empty directory
    the tool did not make: the search writes plan.json and more there and must not overwrite the user's files.
    The tool's are: a search's (marked by MARKER; or holding study.db, from before the marker existed) and a
    profile's (search continues in the directory `qradaptor profile` wrote, or profiles into its own)."""
    from ..profile import HEATMAP_FILE, PARTIAL_FILE, RESULT_FILE

    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"lies under {p}, which is a file"
                raise SearchError(f"--out {out} {where}", "pass a directory for the search's outputs: a new one, "
                                  "or the --out of an earlier search to resume it")
            break
    if not out.is_dir() or (out / MARKER).is_file():
        return
    names = sorted(e.name for e in out.iterdir())
    ours = {RESULT_FILE, PARTIAL_FILE, HEATMAP_FILE} | (set(SEARCH_FILES) if "study.db" in names else set())
    foreign = [n for n in names if n not in ours and not n.startswith((".qradaptor", "study.db"))
               and not (n.startswith(".") and n.endswith(".tmp"))]  # our atomic writes' leftovers
    if foreign:
        raise SearchError(f"--out {out} is not empty and was not made by qradaptor (it holds "
                          f"{', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}); the search would "
                          "write plan.json and more there", "choose a new or empty --out directory")


@contextmanager
def locked_search_dir(out: Path, storage_url: str, study: str):
    """Make --out (marked as the tool's by MARKER) and hold an exclusive lock on MARKER while the search runs:
    a second search on the same --out is refused, naming the first; the lock goes with its process, so a
    crashed search never blocks the rerun that resumes it."""
    try:
        with exclusive_lock(out / MARKER, SearchError, {"storage": redact(storage_url), "study": study}):
            yield
    except LockHeld as e:
        holder = e.holder
        raise SearchError(
            f"another search is running in {out} (process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('started', '?')})",
            "wait for it to finish (stopping it and rerunning the same command resumes it), or add evaluators "
            f"to it with `qradaptor worker --storage {holder.get('storage', 'URL')} --study "
            f"{holder.get('study', 'NAME')}`") from None
