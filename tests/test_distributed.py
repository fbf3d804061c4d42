"""Two `qradaptor worker` processes share one search study through a real PostgreSQL server.

The server is a private, throwaway cluster started by the fixture (Debian's `postgresql` package must be
installed; `.ci/run` installs it), or the one named by $QRADAPTOR_TEST_POSTGRES_URL."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import optuna
import pytest
import torch

from qradaptor.commands import search
from qradaptor.search import Search, SearchConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get("QRADAPTOR_TEST_POSTGRES_URL"):
        yield os.environ["QRADAPTOR_TEST_POSTGRES_URL"]
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.fail("PostgreSQL server binaries not found: `apt-get install postgresql` (.ci/run does this), "
                    "or set QRADAPTOR_TEST_POSTGRES_URL to a server you run")
    bindir = os.path.dirname(bins[-1])
    root = tempfile.mkdtemp(prefix="qradaptor-pg-", dir="/tmp")
    os.chmod(root, 0o755)
    data, port = os.path.join(root, "data"), _free_port()
    # PostgreSQL refuses to run as root: run it as the package's `postgres` user when we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")

    def run(*cmd):
        subprocess.run(as_user + list(cmd), check=True, capture_output=True, cwd=root)

    run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "qr")
    run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "qr", "qradaptor_test")
        yield f"postgresql+psycopg2://qr@127.0.0.1:{port}/qradaptor_test"
    finally:
        subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_evaluate_every_trial_exactly_once(postgres_url, tmp_path):
    from conftest import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from qradaptor.data import TokenBlocks
    from qradaptor.models import load_model
    from qradaptor.profile import ProfileSettings, profile_model
    from qradaptor.search import FineTuneFitness

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    words = tmp_path / "words.txt"
    words.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    model, tok = load_model(str(model_dir))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    prior = profile_model(model, tok, ProfileSettings(tokens=128, seq_len=32), blocks=TokenBlocks(ids, ids.clone()),
                          use_cache=False, progress=False)
    from qradaptor.backends import get_backend
    from qradaptor.memory import ModelShapes, predict
    from qradaptor.plan import Plan

    budget = predict(ModelShapes.from_model(model), Plan.uniform(4, 4, 16), get_backend("hqq")).total_bytes
    trials = 10
    search_config = SearchConfig(budget_bytes=budget, trials=trials, population=4, promote=1, refine=0, seq_len=32)
    study_name = "distributed-test"
    # The coordinator creates the study (config + warm start); the workers do the exploration.
    coordinator = Search(model=model, sensitivity=prior, config=search_config, storage=postgres_url,
                         study_name=study_name, fitness=FineTuneFitness(model, tok, data=str(words), config=search_config),
                         run_config={"model": str(model_dir), "data": str(words)}, progress=False)
    for plan, source in coordinator.warm_start_plans():
        coordinator.study.enqueue_trial(coordinator.params(plan), user_attrs={"source": source})

    cmd = [sys.executable, "-m", "qradaptor.cli", "worker", "--storage", postgres_url, "--study", study_name, "-q"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.FAIL not in states  # none lost
    assert trials <= len(complete) <= trials + 1  # each worker may start one trial as the other reaches the count
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # every trial was evaluated by exactly one worker, and both workers took part
    evaluators = [t.user_attrs["worker"] for t in complete]
    assert len(evaluators) == len(complete) and len(set(evaluators)) == 2
    assert all(t.user_attrs["memory_bytes"] <= budget for t in complete)

    # The coordinator continues from the workers' trials without redoing them and writes the outputs.
    result = search(str(model_dir), data=str(words), budget=budget, out=tmp_path / "out", storage=postgres_url,
                    study=study_name, sensitivity=_save(prior, tmp_path), trials=trials,
                    population=4, promote=1, refine=0, seq_len=32, progress=False)
    assert sum(p.fidelity == "cheap" for p in result.points) == len(complete)
    assert (tmp_path / "out" / "plan.json").is_file()


def _save(prior, tmp_path):
    path = tmp_path / "prior"
    prior.save(path)
    return str(path / "sensitivity.json")
