"""Training and profiling against damaged state and bad numbers: a diverging run stops with a clear error and
keeps its last good checkpoint; a run that fails before its first checkpoint leaves nothing behind; damaged
checkpoints, run records and sensitivity profiles are refused with a fix, never a traceback."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from qradaptor.cli import main
from qradaptor.errors import ArtifactError, TrainingError
from qradaptor.profile import ProfileError, ProfileSettings, Sensitivity
from qradaptor.commands import train_plan
from qradaptor.rundir import CHECKPOINTS_DIR, RUN_FILE
from qradaptor.train import STATE_JSON, STATE_TENSORS

PLAN = {"layers": [{"bits": 4, "rank": 8}] * 4}
FAST = dict(seq_len=32, batch_size=2, eval_blocks=0, warmup_steps=0, dtype="float32", progress=False)


@pytest.fixture
def inputs(tmp_path, tiny_dir):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(40)))
    return {"model": str(tiny_dir), "data": str(data), "plan": PLAN}


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(inputs, tmp_path, capsys):
    # lr 1e30: the first update is finite but enormous, so the next forward overflows
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train_plan(out, steps=6, lr=1e30, checkpoint_every=1, **inputs, **FAST)
    assert "diverged at step 2" in e.value.cause and "step-000001" in e.value.cause
    assert "lower --lr" in e.value.fix
    assert [p.name for p in (out / CHECKPOINTS_DIR).iterdir()] == ["step-000001"]
    assert json.loads((out / RUN_FILE).read_text())["status"] == "running"


def test_a_setting_that_is_not_a_run_setting_is_refused_before_anything_is_written(inputs, tmp_path):
    with pytest.raises(TypeError, match=r"unexpected settings \['learning_rate'\].*'lr'"):
        train_plan(tmp_path / "run", learning_rate=1e-3, **inputs, **FAST)
    assert not (tmp_path / "run").exists()
    # the RunConfig fields the CLI has no flag for are settings too
    r = train_plan(tmp_path / "run", steps=1, weight_decay=0.01, max_grad_norm=0.5, **inputs, **FAST)
    assert (r.config.weight_decay, r.config.max_grad_norm) == (0.01, 0.5)
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["config"]["weight_decay"] == 0.01


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(inputs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train_plan(out, steps=6, lr=1e30, checkpoint_every=5, **inputs, **FAST)
    assert "nothing was kept" in e.value.cause
    assert not out.exists()  # so the same --out can be used again, with a sane learning rate
    result = train_plan(out, steps=2, lr=1e-3, **inputs, **FAST)
    assert all(math.isfinite(v) for v in result.train.losses)


def test_the_cli_reports_divergence_in_one_line_with_a_fix(inputs, tmp_path, capsys):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps(PLAN))
    code = main(["train", "--model", inputs["model"], "--data", inputs["data"], "--plan", str(plan), "--steps", "4",
                 "--lr", "1e30", "--seq-len", "32", "--batch-size", "2", "--eval-blocks", "0", "--out",
                 str(tmp_path / "run"), "--dtype", "float32", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qradaptor: error: training diverged") and "fix:" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_config):
    """One run with a checkpoint at step 2, marked as interrupted (as a kill -9 would leave it); tests copy it."""
    from conftest import tiny_tokenizer
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("interrupted")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    data = root / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(40)))
    out = root / "run"
    train_plan(out, steps=2, lr=1e-3, checkpoint_every=1, model=str(root / "tiny"), data=str(data), plan=PLAN, **FAST)
    run = json.loads((out / RUN_FILE).read_text())
    run["status"] = "running"
    run["config"]["steps"] = 4
    (out / RUN_FILE).write_text(json.dumps(run))
    return out


def _interrupted_run(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out, out / CHECKPOINTS_DIR / "step-000002"


def test_the_undamaged_copy_resumes(interrupted, tmp_path):
    out, _ = _interrupted_run(interrupted, tmp_path)
    result = train_plan(out, resume=True, progress=False)
    assert result.resumed_from == 2 and len(result.train.losses) == 4


@pytest.mark.parametrize("damage", ["truncated optimizer state", "garbage adapter", "trainer_state not JSON",
                                    "trainer_state missing keys", "trainer_state not an object"])
def test_resume_from_a_damaged_checkpoint_is_refused_with_a_fix(interrupted, tmp_path, damage):
    out, ckpt = _interrupted_run(interrupted, tmp_path)
    if damage == "truncated optimizer state":
        data = (ckpt / STATE_TENSORS).read_bytes()
        (ckpt / STATE_TENSORS).write_bytes(data[: len(data) // 3])
    elif damage == "garbage adapter":
        (ckpt / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "trainer_state not JSON":
        (ckpt / STATE_JSON).write_text('{"format": 1, "step": ')
    elif damage == "trainer_state missing keys":
        (ckpt / STATE_JSON).write_text(json.dumps({"format": 1, "step": 2}))
    else:
        (ckpt / STATE_JSON).write_text("[1, 2]")
    with pytest.raises(ArtifactError) as e:
        train_plan(out, resume=True, progress=False)
    assert str(ckpt) in e.value.cause and "--resume" in e.value.fix


@pytest.mark.parametrize("content", ['{"status": "running"', "[]", '{"status": "running", "config": {"lr": 1}}',
                                     '{"config": {"no_such_setting": 1}, "plan": {"layers": []}}'])
def test_resume_with_a_damaged_run_record_is_refused_with_a_fix(interrupted, tmp_path, content):
    out, _ = _interrupted_run(interrupted, tmp_path)
    (out / RUN_FILE).write_text(content)
    with pytest.raises(ArtifactError) as e:
        train_plan(out, resume=True, progress=False)
    assert "run" in e.value.cause and e.value.fix


@pytest.mark.parametrize("setting, value", [("lr", math.inf), ("lr", 0.0), ("warmup_steps", -1),
                                            ("checkpoint_every", 0), ("eval_blocks", -2), ("start_tokens", 0),
                                            ("start_tokens", 64.5)])
def test_bad_numbers_are_refused_before_anything_is_written(inputs, tmp_path, setting, value):
    out = tmp_path / "run"
    with pytest.raises(ArtifactError) as e:
        train_plan(out, steps=2, **{**inputs, **FAST, setting: value})
    assert setting in e.value.cause
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- profiles


def _profile_dict(layers=4, bits=(2, 3)):
    return {"format": Sensitivity.from_dict.__globals__["FORMAT"], "model_fingerprint": "m", "data_fingerprint": "d",
            "bits": list(bits), "layers": layers,
            "kl": [{str(b): 0.1 * (l + 1) / b for b in bits} for l in range(layers)],
            "weight_error": [{str(b): 0.01 for b in bits} for _ in range(layers)]}


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["kl"].pop(), "4 layers but has 3 KL rows"),
    (lambda d: d["kl"][1].update({"2": float("nan")}), "KL nan at 2 bits"),
    (lambda d: d["kl"][2].update({"3": -0.5}), "KL -0.5 at 3 bits"),
    (lambda d: d["weight_error"][0].update({"2": float("inf")}), "weight error inf"),
    (lambda d: d["kl"][0].pop("3"), "at bits [2]"),
])
def test_a_damaged_sensitivity_profile_is_refused(tmp_path, edit, needle):
    obj = _profile_dict()
    edit(obj)
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ProfileError) as e:
        Sensitivity.load(path)
    assert needle in e.value.cause and "qradaptor profile" in e.value.fix


def test_a_profile_of_fewer_layers_than_the_model_is_refused():
    profile = Sensitivity.from_dict(_profile_dict(layers=3))
    profile.check_layers(3)
    with pytest.raises(ProfileError, match="profiles 3 decoder layers but the model has 4"):
        profile.check_layers(4)


def test_profile_settings_refuse_what_the_profile_cannot_do():
    for kwargs, needle in [({"bits": (2, 16)}, "cannot profile bits [16]"), ({"group_size": 0}, "group_size"),
                           ({"tokens": 100}, "less than one block")]:
        with pytest.raises(ProfileError, match=None) as e:
            ProfileSettings(**kwargs)
        assert needle in e.value.cause


def test_default_tokens_fit_small_data_and_explicit_tokens_do_not(tiny_model, tmp_path, caplog):
    from conftest import tiny_tokenizer

    from qradaptor.data import DataError
    from qradaptor.profile import calibration_blocks

    data = tmp_path / "small.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i + j) % 120}" for j in range(40)) for i in range(30)))
    blocks = calibration_blocks(tiny_tokenizer(), ProfileSettings(tokens=None, seq_len=32, data=str(data)))
    assert 0 < len(blocks) < 4096 // 32  # all the small split has, not the default 128 blocks
    with pytest.raises(DataError, match="--tokens"):
        calibration_blocks(tiny_tokenizer(), ProfileSettings(tokens=4096, seq_len=32, data=str(data)))


def test_a_damaged_profile_cache_entry_is_recomputed(tiny_model, tmp_path, monkeypatch):
    from conftest import tiny_tokenizer

    from qradaptor.profile import profile_model

    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 3 + j) % 120}" for j in range(40)) for i in range(60)))
    settings = ProfileSettings(bits=(2,), tokens=128, seq_len=32, data=str(data))
    first = profile_model(tiny_model, tiny_tokenizer(), settings, progress=False)
    entries = list((tmp_path / "cache" / "profiles").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text('{"format": ')  # a crash of another tool, a full disk, a hand edit
    again = profile_model(tiny_model, tiny_tokenizer(), settings, progress=False)
    assert not again.from_cache and again.kl == first.kl
    assert Sensitivity.load(entries[0]).kl == first.kl  # the entry was rewritten


def test_a_new_run_continues_a_search_prefix_run_exactly(inputs, tmp_path, capsys):
    """`train --init-from` a run the search kept (the first steps of this very fine-tune) trains only the rest and
    ends exactly where a run from step 0 ends; a kept run of another fine-tune is refused before anything is
    written, naming what differs; so is a directory that holds no kept run, from the CLI in one line."""
    from qradaptor.models import load_model
    from qradaptor.plan import Plan
    from qradaptor.search import FineTuneFitness, SearchConfig
    from qradaptor.search.config import Fidelity

    model, tokenizer = load_model(inputs["model"], dtype=torch.bfloat16)
    fitness = FineTuneFitness(model, tokenizer, data=inputs["data"], config=SearchConfig(budget_bytes=1, seq_len=32))
    kept = tmp_path / "kept"
    along = fitness.trajectory(Plan.from_dict(PLAN), Fidelity("prefix", steps=3, eval_blocks=16, batch_size=2,
                                                              schedule_steps=6), [3], keep=kept)
    assert set(along) == {3} and (kept / "snapshot.json").is_file()
    common = {**inputs, "steps": 6, "seq_len": 32, "batch_size": 2, "eval_blocks": 16, "dtype": "bfloat16",
              "progress": False}
    whole = train_plan(tmp_path / "whole", **common)
    continued = train_plan(tmp_path / "continued", init_from=kept, **common)
    assert continued.resumed_from == 3 and continued.train.losses == whole.train.losses
    assert continued.validation["loss"] == whole.validation["loss"]
    assert json.loads((tmp_path / "continued" / RUN_FILE).read_text())["initialised_from"]["step"] == 3

    for name, change, named in (("lr", {"lr": 1e-3}, "lr (0.0003 there, 0.001 here)"),
                                ("steps", {"steps": 8}, "steps (6 there, 8 here)"),
                                ("plan", {"plan": {"layers": [{"bits": 8, "rank": 8}] * 4}}, "plan")):
        with pytest.raises(ArtifactError) as e:
            train_plan(tmp_path / name, init_from=kept, **{**common, **change})
        assert "beginning of another fine-tune" in e.value.cause and named in e.value.cause
        assert not (tmp_path / name).exists()
    with pytest.raises(ArtifactError, match="resum"):
        train_plan(tmp_path / "continued", init_from=kept, resume=True, **common)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps(PLAN))
    code = main(["train", "--model", inputs["model"], "--data", inputs["data"], "--plan", str(plan), "--steps", "6",
                 "--seq-len", "32", "--batch-size", "2", "--out", str(tmp_path / "cli"), "--init-from",
                 str(tmp_path / "whole"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no kept search run (snapshot.json is missing)" in err and "fix:" in err
    assert not (tmp_path / "cli").exists()
