"""Processes sharing one machine's cores (qradaptor.threads): the share, the registry of live processes, the
re-count between training steps, the warning when the machine is oversubscribed, and the --threads flag."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from qradaptor import threads
from qradaptor.threads import Process, live_processes, machine_cores, parse_threads, share


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry of its own; the test process's thread count and sharing state restored afterwards."""
    directory = tmp_path / "processes"
    monkeypatch.setenv(threads.RUNTIME_ENV, str(directory))
    before = torch.get_num_threads()
    children = []
    yield directory, children
    threads.stop_sharing()
    torch.set_num_threads(before)
    for child in children:
        child.kill()
        child.wait()


def start_registered(directory, setting="auto") -> subprocess.Popen:
    """A live process registered in ``directory`` with ``setting`` (it sleeps until killed)."""
    code = (f"from qradaptor import threads; threads.share_cores({setting!r}, directory={str(directory)!r}); "
            "import time; time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not (directory / f"{child.pid}.json").exists():
        assert child.poll() is None, "the child process ended before it registered"
        assert time.monotonic() < deadline, "the child process did not register within 60 s"
        time.sleep(0.05)
    return child


def test_parse_threads_takes_auto_all_or_a_positive_count():
    assert parse_threads("auto") == "auto"
    assert parse_threads(" ALL ") == "all"
    assert parse_threads("3") == 3
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="auto, all or a positive number"):
            parse_threads(bad)


def test_the_share_splits_the_cores_left_by_fixed_processes_oldest_first():
    def procs(*fixed):
        return [Process(pid, str(pid), f) for pid, f in enumerate(fixed, start=100)]

    assert [share(procs(None, None), me, 2) for me in (100, 101)] == [1, 1]
    assert [share(procs(None, None, None), me, 16) for me in (100, 101, 102)] == [6, 5, 5]
    assert [share(procs(4, None, None), me, 8) for me in (101, 102)] == [2, 2]
    # more processes than cores, or fixed ones taking everything: one thread each, never none
    assert [share(procs(None, None, None), me, 2) for me in (100, 101, 102)] == [1, 1, 1]
    assert share(procs(8, None), 101, 8) == 1
    # alone (not registered yet, or the registry unwritable): every core
    assert share([], 7, 6) == 6


def test_the_registry_keeps_live_processes_and_drops_ended_ones(registry):
    directory, children = registry
    child = start_registered(directory)
    children.append(child)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (directory / f"{ended.pid}.json").write_text(json.dumps({"pid": ended.pid, "started": None, "threads": None}))
    # a live pid that started at another time: the process that registered under it has ended
    reused = {"pid": os.getpid(), "started": "1", "threads": None}
    (directory / "reused.json").write_text(json.dumps(reused))
    (directory / "partial.json").write_text("{")  # being written: skipped, not deleted
    (directory / "odd.json").write_text(json.dumps({"pid": "1", "threads": -2}))  # not ours: skipped, not deleted

    assert [p.pid for p in live_processes(directory)] == [child.pid]
    assert not (directory / f"{ended.pid}.json").exists()
    assert not (directory / "reused.json").exists()
    assert (directory / "partial.json").exists() and (directory / "odd.json").exists()
    child.kill()
    child.wait()
    assert live_processes(directory) == []


def test_a_process_takes_its_share_and_the_cores_back_when_the_other_ends(registry, monkeypatch):
    directory, children = registry
    cores = machine_cores()
    assert threads.share_cores("auto") == cores  # alone
    assert torch.get_num_threads() == cores
    child = start_registered(directory)
    children.append(child)
    monkeypatch.setattr(threads, "RECOUNT_SECONDS", 0.0)
    threads.rebalance()
    # each takes half; this process, the older, takes the odd core
    assert torch.get_num_threads() == (cores + 1) // 2
    child.kill()
    child.wait()
    threads.rebalance()
    assert torch.get_num_threads() == cores
    threads.stop_sharing()
    assert not (directory / f"{os.getpid()}.json").exists()


def test_the_training_loop_recounts_between_steps(registry, monkeypatch, tiny_model):
    if machine_cores() < 2:
        pytest.skip("one core: there is nothing to share out")
    from qradaptor import Plan, prepare_model
    from qradaptor.data import TokenBlocks
    from qradaptor.train import TrainConfig, train

    directory, children = registry
    threads.share_cores("auto")
    children.append(start_registered(directory))  # arrives after this process took every core
    assert torch.get_num_threads() == machine_cores()
    monkeypatch.setattr(threads, "RECOUNT_SECONDS", 0.0)
    model = prepare_model(tiny_model, Plan.uniform(4, 4, 4), backend="reference")
    ids = torch.randint(0, 128, (4, 16))
    train(model, TokenBlocks(ids, ids.clone()), TrainConfig(steps=1, batch_size=2, gradient_checkpointing=False),
          progress=False)
    assert torch.get_num_threads() == (machine_cores() + 1) // 2


def test_oversubscription_is_said_once(registry, caplog):
    directory, children = registry
    children.append(start_registered(directory, "all"))  # takes every core
    with caplog.at_level(logging.WARNING, logger="qradaptor"):
        assert threads.share_cores("auto") == 1
        threads._current.recount()
    said = [r.getMessage() for r in caplog.records if "compute threads on" in r.getMessage()]
    assert len(said) == 1 and f"{machine_cores()} cores" in said[0], said


def test_fixed_threads_are_kept_and_all_means_every_core(registry):
    directory, children = registry
    children.append(start_registered(directory))
    assert threads.share_cores(1) == 1
    assert threads.share_cores("all") == machine_cores()
    entry = json.loads((directory / f"{os.getpid()}.json").read_text())
    assert entry["threads"] == machine_cores()


def test_an_unwritable_registry_warns_and_computes_with_every_core(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="qradaptor"):
            assert threads.share_cores("auto", directory=blocker / "processes") == machine_cores()
        assert any("cannot register" in r.getMessage() for r in caplog.records)
    finally:
        threads.stop_sharing()
        torch.set_num_threads(before)


def test_rebalance_does_nothing_unless_sharing_was_asked_for(monkeypatch):
    threads.stop_sharing()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads changed without share_cores"))
    threads.rebalance()


def test_every_compute_command_takes_threads_and_a_bad_setting_is_one_clear_error(monkeypatch, capsys):
    from qradaptor.cli import build_parser, main

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("evaluate", "profile", "search", "worker", "train", "generate", "run", "demo"):
        assert "--threads" in commands[name]._option_string_actions, name
    monkeypatch.setenv(threads.ENV, "many")
    assert main(["profile", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "QRADAPTOR_THREADS='many' is not a thread setting" in err and "fix:" in err
