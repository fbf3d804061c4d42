"""The search against concurrency, foreign and unusable output directories, and changed data (issue #14):
two searches on one --out or one study, a worker joining a live search, trials and leases of dead processes,
and --out that is a file or a directory the tool did not make. Concurrent cases run real processes against
SQLite storage in tmp_path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from qradaptor.backends import get_backend
from qradaptor.cli import main
from qradaptor.memory import ModelShapes, predict
from qradaptor.plan import Plan
from qradaptor.commands import search, worker
from qradaptor.search import DEFAULT_BITS, DEFAULT_RANKS, MARKER, SearchError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model directory, its sensitivity profile, and a 4-bit budget."""
    from conftest import tiny_profiled

    d, model, prior = tiny_profiled(tmp_path_factory)
    budget = predict(ModelShapes.from_model(model), Plan.uniform(4, 4, 16), get_backend("hqq")).total_bytes
    return d, prior, budget


def fast_fitness(plan, fidelity):
    return sum(4.0 ** -c.bits + 0.02 / c.rank for c in plan.layers), fidelity.steps


KW = dict(trials=6, population=4, promote=1, refine=1, progress=False, fitness=fast_fitness, seq_len=32)

# A search in its own process whose fitness holds its first trial RUNNING until the test creates GATE.
BLOCKED_SEARCH = r"""
import os, sys, time
from pathlib import Path
from qradaptor.commands import search
model, data, budget, out, storage, gate, prior = sys.argv[1:8]
def fitness(plan, fidelity):
    Path(gate + ".started").touch()
    deadline = time.time() + 300
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.05)
    return sum(4.0 ** -c.bits + 0.02 / c.rank for c in plan.layers), fidelity.steps
search(model, data=data, budget=int(budget), out=out, storage=storage or None, sensitivity=prior, trials=6,
       population=4, promote=1, refine=1, progress=False, fitness=fitness, seq_len=32)
"""


def start_blocked_search(tiny, words, out, gate, storage=""):
    d, prior, budget = tiny
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_SEARCH, str(d), words, str(budget), str(out), storage,
                             str(gate), saved_prior(prior, gate.parent)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not Path(f"{gate}.started").exists():  # in its first trial: holding the --out lock and the study
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc


def saved_prior(prior, tmp_path) -> str:
    prior.save(tmp_path / "prior")
    return str(tmp_path / "prior" / "sensitivity.json")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "qradaptor.cli", *args, "-q"], capture_output=True, text=True,
                          timeout=300)


def assert_clean_error(rc, err, *needles):
    """One `qradaptor: error:` line, a `  fix:` line, exit 2, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 2 and lines[0].startswith("qradaptor: error: ") and lines[1].startswith("  fix: "), err
    for needle in needles:
        assert needle in err, err


def trials_of(url, name="qradaptor"):
    return optuna.load_study(study_name=name, storage=url).trials


# --- two searches, a worker ----------------------------------------------------------------------------


def test_second_search_on_the_same_out_or_study_is_refused(tiny, words, tmp_path):
    d, _, budget = tiny
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = start_blocked_search(tiny, words, tmp_path / "a", tmp_path / "gate", storage=url)
    try:
        common = ["search", "--model", str(d), "--data", words, "--budget", str(budget), "--trials", "6",
                  "--population", "4", "--seq-len", "32", "--sensitivity", saved_prior(tiny[1], tmp_path)]
        same_out = cli(*common, "--out", str(tmp_path / "a"), "--storage", url)
        assert_clean_error(same_out.returncode, same_out.stderr, "another search is running in",
                           f"process {first.pid}", "qradaptor worker --storage")
        same_study = cli(*common, "--out", str(tmp_path / "b"), "--storage", url)
        assert_clean_error(same_study.returncode, same_study.stderr, "already being searched by process",
                           f"{first.pid} on {socket.gethostname()}", "qradaptor worker")
        assert not (tmp_path / "b" / "plan.json").exists()
    finally:
        (tmp_path / "gate").touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]  # the first search was not disturbed
    trials = trials_of(url)
    assert trials and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {f"{socket.gethostname()}:{first.pid}"}
    refine = trials_of(url, "qradaptor:refine")
    keys = [t.user_attrs["plan_key"] for t in refine]
    assert len(keys) == len(set(keys)) and all(t.state == TrialState.COMPLETE for t in refine)
    assert (tmp_path / "a" / "plan.json").is_file()


def test_worker_joining_a_live_search_fails_none_of_its_trials(tiny, words, tmp_path):
    """The worker's start used to fail every RUNNING trial of the SQLite study, including the search's live one,
    which then died with UpdateFinishedTrialError. Now each trial is evaluated once, by one process."""
    out = tmp_path / "s"
    first = start_blocked_search(tiny, words, out, tmp_path / "gate")
    url = f"sqlite:///{out / 'study.db'}"
    try:
        joined = cli("worker", "--storage", url, "--study", "qradaptor")
        assert joined.returncode == 0, joined.stderr[-3000:]
        running = [t for t in trials_of(url) if t.state == TrialState.RUNNING]
        assert len(running) == 1 and running[0].user_attrs["worker"].endswith(f":{first.pid}")  # still live
    finally:
        (tmp_path / "gate").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    trials = trials_of(url)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials}
    assert str(first.pid) in workers and len(workers) == 2  # both took part, each trial once
    assert (out / "plan.json").is_file()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _running_trial(study, storage, params, worker_id):
    """A trial RUNNING in ``study`` as a process ``worker_id`` ("host:pid") would leave it, heartbeat included."""
    from qradaptor.search.storage import trial_id

    study.enqueue_trial(params)
    trial = study.ask()
    for name in params:
        trial.suggest_categorical(name, list(DEFAULT_BITS if name.startswith("b") else DEFAULT_RANKS))
    trial.set_user_attr("worker", worker_id)
    storage.record_heartbeat(trial_id(storage, study, trial))
    return trial.number


def test_dead_processes_trials_are_failed_and_retried_live_ones_kept(tiny, words, tmp_path, monkeypatch):
    d, prior, budget = tiny
    prior.save(tmp_path)
    search(str(d), data=words, budget=budget, out=tmp_path, **{**KW, "trials": 4})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    from qradaptor.search import open_storage

    storage = open_storage(url)
    study = optuna.load_study(study_name="qradaptor", storage=storage)
    params = dict(study.trials[0].params)
    here_dead = _running_trial(study, storage, params, f"{socket.gethostname()}:{_dead_pid()}")
    elsewhere = _running_trial(study, storage, params, "another-machine:1")  # may be a live worker there
    # created, then its process killed before it tagged the trial with itself: no worker, no heartbeat
    untagged = storage.get_trial_number_from_id(storage.create_new_trial(storage.get_study_id_from_name("qradaptor")))

    search(str(d), data=words, budget=budget, out=tmp_path, **{**KW, "trials": 6})
    trials = trials_of(url)
    assert trials[here_dead].state == TrialState.FAIL  # its process is gone: failed at once and retried
    assert any(t.system_attrs.get("failed_trial") == here_dead and t.state == TrialState.COMPLETE for t in trials)
    assert trials[elsewhere].state == TrialState.RUNNING  # fresh heartbeat: not failed by another process
    assert trials[untagged].state == TrialState.RUNNING  # younger than the grace period: may be a live one's

    # once its heartbeat is older than the grace period, it is failed and its plan retried
    monkeypatch.setenv("QRADAPTOR_HEARTBEAT", "1")
    monkeypatch.setenv("QRADAPTOR_GRACE", "1")
    time.sleep(2.5)
    search(str(d), data=words, budget=budget, out=tmp_path, **{**KW, "trials": 8})
    trials = trials_of(url)
    assert trials[elsewhere].state == TrialState.FAIL
    assert trials[untagged].state == TrialState.FAIL
    assert any(t.system_attrs.get("failed_trial") == elsewhere and t.state == TrialState.COMPLETE for t in trials)
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_coordinator_lease_of_a_dead_search_is_taken_over_a_live_one_refused(tiny, words, tmp_path):
    from optuna.trial import create_trial

    from qradaptor.search import open_storage

    d, prior, budget = tiny
    prior.save(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    leases = optuna.create_study(storage=storage, study_name="qradaptor:coordinator")

    def lease(worker_id):
        tid = storage.create_new_trial(storage.get_study_id_from_name(leases.study_name), template_trial=create_trial(
            state=TrialState.RUNNING, user_attrs={"worker": worker_id, "started": "earlier"}))
        storage.record_heartbeat(tid)

    lease(f"{socket.gethostname()}:{_dead_pid()}")  # a search on this machine that was killed
    search(str(d), data=words, budget=budget, out=tmp_path, **KW)
    lease("another-machine:4242")  # a live search elsewhere
    with pytest.raises(SearchError, match="already being searched by process 4242 on another-machine") as e:
        search(str(d), data=words, budget=budget, out=tmp_path, **{**KW, "trials": 8})
    assert "qradaptor worker" in str(e.value) and "heartbeat" in str(e.value)
    assert len(trials_of(url)) == 6  # refused before evaluating anything


# --- output directories ---------------------------------------------------------------------------------


def test_out_that_is_a_file_or_under_one_is_a_clean_error(tiny, words, tmp_path, capsys):
    d, _, budget = tiny
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for out, needle in ((blocker, "is a file"), (blocker / "sub" / "out", f"lies under {blocker}, which is a file")):
        rc = main(["search", "--model", str(d), "--data", words, "--budget", str(budget), "--out", str(out), "-q"])
        assert_clean_error(rc, capsys.readouterr().err, needle)
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_that_cannot_be_written_is_a_clean_error(tiny, words, tmp_path):
    d, _, budget = tiny
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(SearchError, match="cannot write to --out"):
        search(str(d), data=words, budget=budget, out=locked / "out", **KW)


def test_foreign_directory_is_refused_and_left_untouched(tiny, words, tmp_path, capsys):
    d, prior, budget = tiny
    out = tmp_path / "mine"
    out.mkdir()
    (out / "plan.json").write_text('{"my": "own plan"}')
    (out / "notes.txt").write_text("notes")
    prior.save(out)  # even beside a profile: plan.json is not the tool's
    rc = main(["search", "--model", str(d), "--data", words, "--budget", str(budget), "--out", str(out),
               "--sensitivity", str(out / "sensitivity.json"), "-q"])
    assert_clean_error(rc, capsys.readouterr().err, "not made by qradaptor", "notes.txt, plan.json")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plan.json", "sensitivity.json"]
    assert (out / "plan.json").read_text() == '{"my": "own plan"}'


def test_directories_the_tool_made_are_reused(tiny, words, tmp_path):
    d, prior, budget = tiny
    prior.save(tmp_path / "profiled")  # a `qradaptor profile` output directory: the search continues there
    search(str(d), data=words, budget=budget, out=tmp_path / "profiled", **KW)
    assert (tmp_path / "profiled" / MARKER).is_file() and (tmp_path / "profiled" / "plan.json").is_file()
    (tmp_path / "profiled" / "user.txt").write_text("added later")  # the directory stays the tool's
    search(str(d), data=words, budget=budget, out=tmp_path / "profiled", **KW)
    (tmp_path / "profiled" / MARKER).unlink()
    (tmp_path / "profiled" / "user.txt").unlink()
    search(str(d), data=words, budget=budget, out=tmp_path / "profiled", **KW)  # an older search's (study.db)


# --- changed data -------------------------------------------------------------------------------------


def test_resume_refuses_changed_data_contents(tiny, words, tmp_path):
    d, prior, budget = tiny
    out = tmp_path / "out"
    prior.save(out)
    data = tmp_path / "data.txt"
    original = Path(words).read_text()
    data.write_text(original)
    search(str(d), data=str(data), budget=budget, out=out, **KW)
    data.write_text(original.replace("w1 ", "w2 "))  # same path, other contents
    with pytest.raises(SearchError, match="contents of .*data.txt changed") as e:
        search(str(d), data=str(data), budget=budget, out=out, **{**KW, "trials": 8})
    assert "restore the original data" in str(e.value)
    url = f"sqlite:///{out / 'study.db'}"
    with pytest.raises(SearchError, match="contents of .*data.txt changed"):
        worker(storage=url, study="qradaptor", progress=False)
    assert len([t for t in trials_of(url) if t.state == TrialState.COMPLETE]) == 6  # nothing scored on new data
    data.write_text(original)
    search(str(d), data=str(data), budget=budget, out=out, **{**KW, "trials": 8})  # the same data resumes
