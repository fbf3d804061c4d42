"""`qradaptor run` end to end on a tiny model: every stage's output, and a rerun that skips finished stages."""

from __future__ import annotations

import json

import pytest
import torch

from qradaptor.backends import get_backend
from qradaptor.memory import ModelShapes, predict
from qradaptor.models import load_model
from qradaptor.commands.run import run
from qradaptor.plan import Plan
from qradaptor.precision import default_dtype
from qradaptor.errors import QRAdaptorError
from qradaptor.rundir import read_run

TINY_SEARCH = {"population": 4, "promote": 1, "refine": 1, "warm_start": 2,
               "cheap": {"name": "cheap", "steps": 2, "eval_blocks": 2},
               "full": {"name": "full", "steps": 4, "eval_blocks": 4}}


def _count_loads(monkeypatch) -> list[str]:
    """Every model load from here on (the loaders behind `load_model`), by the path loaded."""
    import qradaptor.models as models

    loads: list[str] = []
    real = models._load_dir

    def counting(path, dtype):
        loads.append(str(path))
        return real(path, dtype)

    monkeypatch.setattr(models, "_load_dir", counting)
    return loads


def test_run_produces_every_stage_and_a_rerun_skips_them(tiny_dir, tmp_path, monkeypatch):
    data = tmp_path / "words.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    model, _ = load_model(str(tiny_dir))
    budget = predict(ModelShapes.from_model(model), Plan.uniform(4, 4, 16), get_backend("hqq")).total_bytes
    out = tmp_path / "run"
    kw = dict(data=str(data), budget=budget, out=out, trials=6, steps=6, profile_tokens=128, seq_len=32,
              profile_dtype="float32", search_settings=TINY_SEARCH, train_settings={"eval_blocks": 2},
              progress=False)
    loads = _count_loads(monkeypatch)
    first = run(str(tiny_dir), **kw)
    assert len(loads) == 1  # profile, search, fine-tune, test loss and export all use the one loaded model
    for path in ("profile/sensitivity.json", "search/plan.json", "search/pareto.json", "train/run.json",
                 "metrics.json", "model/qradaptor/export.json", "model/adapter/adapter_config.json"):
        assert (out / path).is_file(), path
    assert first["test_loss_after"] < first["test_loss_before"]
    plan = Plan.load(out / "search" / "plan.json")
    # priced as the run stores it: in the dtype it trained in (bf16 scales and zeros by default)
    dtype = getattr(torch, read_run(out / "train")["config"]["dtype"])
    assert predict(ModelShapes.from_model(model), plan, get_backend("hqq", compute_dtype=dtype)).total_bytes <= budget

    stamps = {p: (out / p).stat().st_mtime_ns for p in ("profile/sensitivity.json", "search/pareto.json",
                                                         "train/run.json", "metrics.json")}
    (out / "metrics.json").unlink()  # as if the run had died after training
    loads.clear()
    again = run(str(tiny_dir), **kw)
    assert len(loads) == 1  # the finished fine-tune is rebuilt on the model loaded for the fingerprints
    assert again["test_loss_after"] == first["test_loss_after"]
    for p, stamp in stamps.items():
        if p != "metrics.json":
            assert (out / p).stat().st_mtime_ns == stamp, f"{p} was redone"
    assert json.loads((out / "metrics.json").read_text())["test_loss_before"] == first["test_loss_before"]


def _run_options() -> set[str]:
    from qradaptor.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for action in sub.choices["run"]._actions for o in action.option_strings}


def test_stage_fixes_inside_run_name_only_what_run_offers(tmp_path):
    import re

    from qradaptor.errors import ArtifactError
    from qradaptor.commands import train_plan
    from qradaptor.commands.run import run_fix
    from qradaptor.train import load_train_state

    damaged = tmp_path / "checkpoints" / "step-000002"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text("{")
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", "config": {}, "plan": {}}))
    fixes = []
    for failing in (lambda: load_train_state(damaged), lambda: train_plan(tmp_path, plan={"layers": []})):
        with pytest.raises(ArtifactError) as e:
            failing()
        assert "--resume" in e.value.fix  # what `train` says
        fixes.append(run_fix(e.value.fix))
    options = _run_options()
    for fix in fixes:
        assert "qradaptor run" in fix
        assert set(re.findall(r"--[a-z][a-z-]*", fix)) <= options, fix


def test_the_search_ranks_plans_at_the_fine_tunes_rate_unless_given_another(tiny_dir, tmp_path, caplog):
    """At a high fine-tune rate the search's fine-tunes train at it too and the fine-tune continues the chosen plan's
    run; ``search_lr`` sets another rate for the search, whose runs the fine-tune then is not the continuation of:
    it trains from step 0, without a warning."""
    import logging

    data = tmp_path / "words.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    model, _ = load_model(str(tiny_dir))
    budget = predict(ModelShapes.from_model(model), Plan.uniform(4, 4, 16), get_backend("hqq")).total_bytes
    lr = 3e-3
    kw = dict(data=str(data), budget=budget, trials=4, steps=6, profile_tokens=128, seq_len=32,
              search_settings=TINY_SEARCH, train_settings={"eval_blocks": 2, "lr": lr}, progress=False)
    run(str(tiny_dir), out=tmp_path / "own", **kw)
    pareto = json.loads((tmp_path / "own" / "search" / "pareto.json").read_text())
    record = json.loads((tmp_path / "own" / "train" / "run.json").read_text())
    assert pareto["settings"]["cheap"]["lr"] == pareto["settings"]["full"]["lr"] == record["config"]["lr"] == lr
    assert record["initialised_from"]["step"] == pareto["kept_step"] == 4
    with caplog.at_level(logging.INFO, logger="qradaptor"):
        run(str(tiny_dir), out=tmp_path / "given", search_lr=1e-3, **kw)
    pareto = json.loads((tmp_path / "given" / "search" / "pareto.json").read_text())
    record = json.loads((tmp_path / "given" / "train" / "run.json").read_text())
    assert pareto["settings"]["cheap"]["lr"] == pareto["settings"]["full"]["lr"] == 1e-3
    assert record["config"]["lr"] == lr and "initialised_from" not in record
    assert f"ranks plans at lr 0.001, the fine-tune trains at {lr:g}" in caplog.text
    assert "not continuing" not in caplog.text
    with pytest.raises(QRAdaptorError) as e:  # refused before any stage
        run(str(tiny_dir), out=tmp_path / "bad", search_lr=-1.0, **kw)
    assert "--search-lr" in e.value.cause and not (tmp_path / "bad" / "profile").exists()


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    import fcntl

    from qradaptor.errors import ArtifactError
    from qradaptor.commands.run import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:  # what a live `qradaptor run` holds
        held.write(json.dumps({"pid": 4242, "host": "elsewhere", "started": "2026-01-01 00:00:00"}) + "\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ArtifactError) as e:
            run(None, budget="4bit", out=out)
        assert "another `qradaptor run`" in e.value.cause and "process 4242 on elsewhere" in e.value.cause
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else was written


def test_the_fine_tune_continues_the_searchs_run_of_the_chosen_plan(tiny_dir, tmp_path, caplog):
    """`run` searches on the first steps of the fine-tune's schedule, in its dtype, and the fine-tune continues
    the chosen plan's kept run: it trains only the steps the search did not, and ends where a fine-tune of the
    plan from step 0 ends. A kept run of another schedule (here: another warm-up) is not continued."""
    import logging

    from qradaptor.commands import train_plan

    data = tmp_path / "words.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    model, _ = load_model(str(tiny_dir))
    budget = predict(ModelShapes.from_model(model), Plan.uniform(4, 4, 16), get_backend("hqq")).total_bytes
    kw = dict(data=str(data), budget=budget, trials=4, steps=6, profile_tokens=128, seq_len=32,
              search_settings=TINY_SEARCH, train_settings={"eval_blocks": 2}, progress=False)
    run(str(tiny_dir), out=tmp_path / "run", **kw)
    pareto = json.loads((tmp_path / "run" / "search" / "pareto.json").read_text())
    record = json.loads((tmp_path / "run" / "train" / "run.json").read_text())
    # the search's fine-tunes compute in the final one's dtype (the machine's default: float32 in the tests)
    assert pareto["settings"]["dtype"] == record["config"]["dtype"] == default_dtype().dtype
    assert pareto["settings"]["full"]["schedule_steps"] == 6
    assert record["initialised_from"]["step"] == pareto["kept_step"] == 4  # the chosen plan was promoted
    metrics = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    assert len(metrics["train_losses"]) == 6
    # the same plan from step 0, trained by `train` alone
    scratch = train_plan(tmp_path / "scratch", plan=tmp_path / "run" / "search" / "plan.json", model=str(tiny_dir),
                         data=str(data), steps=6, seq_len=32, eval_blocks=2, progress=False)
    assert scratch.validation["loss"] == metrics["validation"]["loss"]
    assert scratch.train.losses == metrics["train_losses"]

    with caplog.at_level(logging.WARNING, logger="qradaptor"):
        run(str(tiny_dir), out=tmp_path / "other", **{**kw, "train_settings": {"eval_blocks": 2, "warmup_steps": 2}})
    assert "not continuing the search's run" in caplog.text and "warmup_steps" in caplog.text
    assert "initialised_from" not in json.loads((tmp_path / "other" / "train" / "run.json").read_text())
    # the start on fewer calibration tokens: the search's fine-tunes start as the final one does, which continues
    run(str(tiny_dir), out=tmp_path / "few", **{**kw, "train_settings": {"eval_blocks": 2, "start_tokens": 64}})
    pareto = json.loads((tmp_path / "few" / "search" / "pareto.json").read_text())
    record = json.loads((tmp_path / "few" / "train" / "run.json").read_text())
    assert pareto["settings"]["start_tokens"] == record["config"]["start_tokens"] == 64
    assert record["initialised_from"]["step"] == 4
