"""`--target-modules` on `search`, `run` and `train` (issue #32 item 1): the search's plans, its budget and its
study carry the targets; an impossible choice is refused before any work, naming only the model's linear modules
and the flag; `train` adapts the given targets instead of the plan's, and a resume that changes them is refused."""

from __future__ import annotations

import json

import pytest

from qradaptor.backends import get_backend
from qradaptor.cli import main
from qradaptor.memory import ModelShapes, parse_budget, predict
from qradaptor.plan import DEFAULT_TARGET_MODULES, Plan
from qradaptor.search import SearchConfig
from qradaptor.search.storage import _config_fingerprint
from test_search_reliability import assert_clean_error as assert_refused

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_profiled

    d, model, prior = tiny_profiled(tmp_path_factory)
    words = tmp_path_factory.mktemp("data") / "words.txt"
    words.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    return d, model, prior, str(words)


def test_search_plans_and_prices_the_given_targets(tiny, tmp_path, capsys):
    d, model, prior, words = tiny
    out = tmp_path / "s"
    prior.save(out.mkdir() or out)
    args = ["search", "--model", str(d), "--data", words, "--budget", "4bit", "--trials", "2", "--population", "2",
            "--promote", "0", "--refine", "0", "--seq-len", "32", "--target-modules", "q_proj,v_proj", "--out",
            str(out), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    plan = Plan.load(out / "plan.json")
    assert plan.target_modules == ("q_proj", "v_proj")
    pareto = json.loads((out / "pareto.json").read_text())
    shapes, backend = ModelShapes.from_model(model), get_backend("hqq")
    # "4bit" is uniform 4-bit r16 with adapters on the same targets: fewer bytes than on all seven
    budget = parse_budget("4bit", shapes, backend, target_modules=("q_proj", "v_proj"))
    assert pareto["budget_bytes"] == budget < parse_budget("4bit", shapes, backend)
    assert predict(shapes, plan, backend).total_bytes <= budget
    assert pareto["settings"]["target_modules"] == ["q_proj", "v_proj"]

    # the study is the targets': continuing it with others is refused, naming the setting
    capsys.readouterr()
    other = [a if a != "q_proj,v_proj" else "q_proj" for a in args]
    rc = main(other)
    err = capsys.readouterr().err
    assert rc == 2 and "target_modules" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["search", "run"])
def test_impossible_targets_refused_before_any_work(command, tiny, tmp_path, capsys):
    d, _, _, words = tiny
    out = tmp_path / "out"
    rc = main([command, "--model", str(d), "--data", words, "--budget", "4bit", "--target-modules", "q_proj,norm",
               "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert_refused(rc, err, "['norm']", "--target-modules", str(LINEARS))
    assert "input_layernorm" not in err and "self_attn" not in err  # only linears are offered
    assert not (out / "profile").exists() and not (out / "sensitivity.json").exists()  # nothing was profiled


def test_target_modules_flag_is_a_list_of_names(capsys):
    rc = main(["search", "--budget", "4bit", "--out", "x", "--target-modules", "q_proj,,v_proj"])
    assert_refused(rc, capsys.readouterr().err, "comma-separated module names")


def test_train_adapts_the_given_targets_and_resume_keeps_them(tiny, tmp_path, capsys):
    d, _, _, words = tiny
    plan = tmp_path / "plan.json"
    Plan.uniform(4, 4, 8).save(plan)
    out = tmp_path / "run"
    base = ["train", "--model", str(d), "--plan", str(plan), "--data", words, "--seq-len", "32", "--batch-size", "2",
            "--eval-blocks", "1", "--out", str(out), "-q"]
    assert main([*base, "--steps", "2", "--target-modules", "k_proj,down_proj"]) == 0, capsys.readouterr().err
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["down_proj", "k_proj"]
    assert json.loads((out / "plan.json").read_text())["target_modules"] == ["k_proj", "down_proj"]

    # a finished run cannot be resumed; a new one with an impossible target is refused before it is written
    capsys.readouterr()
    rc = main([*base[:-3], "--out", str(tmp_path / "bad"), "-q", "--steps", "2", "--target-modules", "mlp"])
    assert_refused(rc, capsys.readouterr().err, "['mlp']", "--target-modules")
    assert not (tmp_path / "bad" / "run.json").exists()


def test_resume_with_other_targets_is_refused(tiny, tmp_path, capsys):
    from qradaptor.commands.train import _plan_to_train

    saved = {"plan": Plan.uniform(4, 4, 8, target_modules=("q_proj",)).to_dict()}
    with pytest.raises(Exception) as e:
        _plan_to_train(None, saved, tmp_path, ("v_proj",))
    assert "target modules ['q_proj'] → ['v_proj']" in str(e.value)
    assert _plan_to_train(None, saved, tmp_path, ["q_proj"]).target_modules == ("q_proj",)


def test_studies_from_before_keep_the_default_targets():
    old = {"budget_bytes": 1000, "bits": [2, 4], "ranks": [8, 16], "group_size": 64}
    assert SearchConfig.from_dict(old).target_modules == DEFAULT_TARGET_MODULES
    new = SearchConfig(budget_bytes=1000, bits=(2, 4), ranks=(8, 16)).to_dict()
    assert _config_fingerprint(old)["target_modules"] == _config_fingerprint(new)["target_modules"]
    assert _config_fingerprint({**new, "target_modules": ["q_proj"]}) != _config_fingerprint(new)
