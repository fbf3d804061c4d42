"""Reliability of `qradaptor run` and `export` (issue 14): stale stages are redone, interrupted ones continue,
directories the tool did not make are refused and never deleted from, damaged outputs and tampered exports
give one clear error.

Most `run` tests replace the search, training, evaluation and export with fakes that record their calls and
write the files the real stages write (the profile is real: tiny and cached), so the stage bookkeeping is
tested in seconds; one test runs every stage for real with a changed budget."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch

from qradaptor.cli import main
from qradaptor.rundir import RunConfig

pipeline = importlib.import_module("qradaptor.commands.run")  # the attribute `run` of commands is the function
search_command = importlib.import_module("qradaptor.commands.search")
train_command = importlib.import_module("qradaptor.commands.train")
export_command = importlib.import_module("qradaptor.commands.export")
export_module = importlib.import_module("qradaptor.export")


def words_file(path, n_lines=120, shift=0):
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3 + shift) % 120}" for j in range(40))
                                for i in range(n_lines)))
    return str(path)


def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, needle):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("qradaptor: error:") and needle in err, err
    assert len(lines) == 2 and lines[1].startswith("  fix: ") and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------- run, faked stages
class Calls(list):
    fail: dict
    kwargs: dict  # stage → the keyword arguments of its last call


@pytest.fixture
def fakes(monkeypatch):
    """Search, train, evaluate and export replaced by fakes that log calls to ``calls`` as (stage, detail)."""
    from qradaptor.plan import Plan

    calls = Calls()
    real_profile = importlib.import_module("qradaptor.profile").profile_model

    def profile(*args, **kwargs):
        calls.append(("profile", None))
        return real_profile(*args, **kwargs)

    def search(model, *, out, budget, alpha, trials, **kwargs):
        calls.kwargs["search"] = kwargs
        out.mkdir(parents=True, exist_ok=True)
        resumed = (out / "study.db").is_file()  # a fresh search must not find an old study
        calls.append(("search", {"resumed": resumed}))
        (out / "study.db").write_text(json.dumps({"budget": budget, "alpha": alpha, "trials": trials}))
        if calls_fail.pop("search", False):
            raise KeyboardInterrupt
        Plan.uniform(4, 4, 8).save(out / "plan.json")
        (out / "pareto.json").write_text(json.dumps({"budget": budget}))

    def train_plan(out, *, plan, model, data, steps, resume, **kwargs):
        calls.kwargs["train"] = kwargs
        calls.append(("train", {"resume": resume, "steps": steps, "existed": out.exists()}))
        out.mkdir(parents=True, exist_ok=True)
        run = {"status": "running", "config": {"model": model.spec, "steps": steps},
               "plan": json.loads(plan.read_text())}
        if resume:
            run = json.loads((out / "run.json").read_text())
        (out / "run.json").write_text(json.dumps(run))
        if calls_fail.pop("train", False):
            raise KeyboardInterrupt
        (out / "adapter").mkdir(exist_ok=True)
        (out / "adapter" / "adapter_config.json").write_text("{}")
        (out / "run.json").write_text(json.dumps({**run, "status": "finished"}))
        return SimpleNamespace(model="trained in memory")

    def open_run(run_dir, base=None, **kwargs):
        return SimpleNamespace(model=f"rebuilt from {run_dir}", tokenizer=base.tokenizer)

    def held_out_metrics(model, tokenizer, **kwargs):
        calls.append(("metrics", model))
        return {"test_loss_before": 2.0, "test_loss_after": 1.5, "test_perplexity_after": 4.5, "test_tokens": 64}

    def export(run_dir, out, **kwargs):
        calls.append(("export", None))
        (out / "qradaptor").mkdir(parents=True)
        (out / "qradaptor" / "export.json").write_text(json.dumps({
            "format": export_module.PACKED_FORMAT, "memory": {"total": 1},
            "files": ["qradaptor/", "qradaptor/export.json"]}))
        return {"memory": {"total": 1}}

    calls_fail = {}
    monkeypatch.setattr(importlib.import_module("qradaptor.profile"), "profile_model", profile)
    monkeypatch.setattr(search_command, "search", search)
    monkeypatch.setattr(train_command, "train_plan", train_plan)
    monkeypatch.setattr(pipeline, "held_out_metrics", held_out_metrics)
    monkeypatch.setattr(export_module, "open_run", open_run)
    monkeypatch.setattr(export_command, "export", export)
    calls.fail = calls_fail  # a stage name → interrupt that stage's next call (after it wrote its first files)
    calls.kwargs = {}
    return calls


@pytest.fixture
def setup(tiny_dir, tmp_path, fakes):
    settings = dict(model=str(tiny_dir), data=words_file(tmp_path / "words.txt"), budget="4bit", out=tmp_path / "run",
                    alpha=0.5, trials=3, steps=4, profile_tokens=64, seq_len=32, profile_dtype="float32",
                    progress=False)
    return settings, fakes


def do_run(settings, calls, **changed):
    calls.clear()
    s = {**settings, **changed}
    model = s.pop("model")
    result = pipeline.run(model, **s)
    return result, list(dict.fromkeys(stage for stage, _ in calls))  # the stages that ran, in order


def other_model(tmp_path):
    from conftest import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "other")
    tiny_tokenizer().save_pretrained(tmp_path / "other")
    return str(tmp_path / "other")


ALL = ["profile", "search", "train", "metrics", "export"]


@pytest.mark.parametrize("change, redone", [
    ("budget", ["search", "train", "metrics", "export"]),
    ("alpha", ["search", "train", "metrics", "export"]),
    ("trials", ["search", "train", "metrics", "export"]),
    # the search's default fidelities (8 and 16 steps) are longer than 4 or 7 steps, so they are not the
    # fine-tune's first steps and its steps do not change the search; with 12 steps the cheap one is
    ("steps", ["train", "metrics", "export"]),
    ("steps of searched fine-tunes", ["search", "train", "metrics", "export"]),
    ("data contents", ALL),
    ("data path", ALL),
    ("model", ALL),
])
def test_a_changed_setting_redoes_its_stage_and_every_later_one(setup, tmp_path, change, redone):
    settings, calls = setup
    first, stages = do_run(settings, calls)
    assert stages == ALL
    # each stage's seconds are recorded in stages.json and returned (what the run's profile share is measured by)
    recorded = json.loads((tmp_path / "run" / pipeline.STAGES_FILE).read_text())["stages"]
    assert list(first["stage_seconds"]) == ALL and all(v >= 0 for v in first["stage_seconds"].values())
    assert first["stage_seconds"] == {stage: recorded[stage]["seconds"] for stage in ALL}
    old_study = (tmp_path / "run" / "search" / "study.db").read_text()
    kept, stages = do_run(settings, calls)
    assert stages == []  # the same command again: everything kept, with the seconds it took then
    assert kept["stage_seconds"] == first["stage_seconds"]

    if change == "budget":
        changed = {"budget": "2bit"}
    elif change == "alpha":
        changed = {"alpha": 0.9}
    elif change == "trials":
        changed = {"trials": 5}
    elif change == "steps":
        changed = {"steps": 7}
    elif change == "steps of searched fine-tunes":
        changed = {"steps": 12}  # the default fidelities (8 and 16 steps): the cheap one is the first 8 of 12
    elif change == "data contents":  # same path, other contents
        words_file(tmp_path / "words.txt", shift=5)
        changed = {}
    elif change == "data path":
        changed = {"data": words_file(tmp_path / "other.txt", n_lines=100)}
    else:
        changed = {"model": other_model(tmp_path)}
    _, stages = do_run(settings, calls, **changed)
    assert stages == redone
    if "search" in redone:
        assert dict(calls)["search"] == {"resumed": False}  # the old study was deleted, not resumed
        assert (tmp_path / "run" / "search" / "study.db").read_text() != old_study or change in (
            "data contents", "data path", "model", "steps of searched fine-tunes")
    if "train" in redone:
        assert dict(calls)["train"] == {"resume": False, "steps": changed.get("steps", 4), "existed": False}
    record = json.loads((tmp_path / "run" / pipeline.STAGES_FILE).read_text())
    assert all(r["status"] == "finished" for r in record["stages"].values()) and set(record["stages"]) == set(ALL)
    for key, value in changed.items():
        assert record["settings"][key] == value
    assert do_run(settings, calls, **changed)[1] == []  # and now that is what is kept


AFTER_SEARCH = ["search", "train", "metrics", "export"]
AFTER_TRAIN = ["train", "metrics", "export"]


@pytest.mark.parametrize("flag, value, redone", [
    # the search measures plans on the first steps of the final fine-tune's schedule (12 steps here): its batch
    # size and learning rate are the search's too; the search also takes run's seed and backend
    ("--batch-size", "2", AFTER_SEARCH), ("--lr", "0.001", AFTER_SEARCH), ("--seed", "3", AFTER_SEARCH),
    ("--backend", "reference", AFTER_SEARCH), ("--grad-accum", "2", AFTER_TRAIN),
    ("--warmup-steps", "2", AFTER_TRAIN), ("--eval-every", "3", AFTER_TRAIN), ("--eval-blocks", "2", AFTER_TRAIN),
    ("--checkpoint-every", "2", AFTER_TRAIN), ("--max-train-blocks", "8", AFTER_TRAIN),
    ("--no-gradient-checkpointing", None, AFTER_TRAIN),
    ("--population", "3", AFTER_SEARCH), ("--promote", "2", AFTER_SEARCH), ("--refine", "0", AFTER_SEARCH),
    ("--bits", "3,4,8", AFTER_SEARCH), ("--ranks", "8,16", AFTER_SEARCH), ("--group-sizes", "32,64", AFTER_SEARCH),
    ("--dtype", "bfloat16", ALL),  # the profile runs in the run's dtype (float32 in the tests)
    ("--profile-tokens", "96", ALL),
])
def test_run_takes_each_setting_of_train_and_search_and_a_change_redoes_what_it_affects(setup, capsys, tmp_path,
                                                                                      flag, value, redone):
    settings, calls = setup
    argv = ["run", "--model", settings["model"], "--data", settings["data"], "--budget", "4bit", "--out",
            settings["out"], "--trials", "3", "--steps", "12", "--seq-len", "32", "--profile-tokens", "64", "-q"]
    assert cli(capsys, *argv)[0] == 0
    calls.clear()
    assert cli(capsys, *argv)[0] == 0 and calls == []  # the same command again: everything kept
    changed = [*argv, flag] + ([] if value is None else [value])
    code, _, err = cli(capsys, *changed)
    assert code == 0, err
    assert list(dict.fromkeys(stage for stage, _ in calls)) == redone
    name = flag.removeprefix("--no-").removeprefix("--").replace("-", "_")
    if name in {f.name for f in dataclasses.fields(RunConfig) if "help" in f.metadata}:  # what the fine-tune got
        expected = False if value is None else (value if name in ("backend", "dtype") else float(value))
        assert calls.kwargs["train"][name] == expected, calls.kwargs["train"]
    if "search" in redone and name in ("population", "promote", "refine", "seed", "backend"):
        assert str(calls.kwargs["search"][name]) == value, calls.kwargs["search"]
    if name == "group_sizes":
        assert tuple(calls.kwargs["search"][name]) == (32, 64), calls.kwargs["search"]
    calls.clear()
    assert cli(capsys, *changed)[0] == 0 and calls == []  # and now that is what is kept


def test_an_interrupted_search_continues_its_study(setup, tmp_path):
    settings, calls = setup
    calls.fail["search"] = True
    with pytest.raises(KeyboardInterrupt):
        do_run(settings, calls)
    record = json.loads((tmp_path / "run" / pipeline.STAGES_FILE).read_text())["stages"]
    assert record["profile"]["status"] == "finished" and record["search"]["status"] == "running"
    _, stages = do_run(settings, calls)
    assert stages == ["search", "train", "metrics", "export"]
    assert dict(calls)["search"] == {"resumed": True}


def test_an_interrupted_fine_tune_resumes_from_its_checkpoint(setup, tmp_path):
    settings, calls = setup
    calls.fail["train"] = True
    with pytest.raises(KeyboardInterrupt):
        do_run(settings, calls)
    _, stages = do_run(settings, calls)
    assert stages == ["train", "metrics", "export"]
    assert dict(calls)["train"] == {"resume": True, "steps": None, "existed": True}
    # interrupted, then rerun with other steps: the half-trained run is discarded, not resumed
    calls.fail["train"] = True
    with pytest.raises(KeyboardInterrupt):
        do_run(settings, calls, steps=9)
    do_run(settings, calls, steps=10)
    assert dict(calls)["train"] == {"resume": False, "steps": 10, "existed": False}


@pytest.mark.parametrize("damage", ["garbage", "not an object", "keys missing", "deleted"])
@pytest.mark.parametrize("status", ["finished", "running"])
def test_a_damaged_metrics_json_is_recomputed(setup, tmp_path, damage, status):
    settings, calls = setup
    first, _ = do_run(settings, calls)
    assert dict(calls)["metrics"] == "trained in memory"  # measured on the model the fine-tune left
    metrics = tmp_path / "run" / "metrics.json"
    if damage == "garbage":
        metrics.write_bytes(b"\xff\xfe{not json")
    elif damage == "not an object":
        metrics.write_text("[1, 2]")
    elif damage == "keys missing":
        metrics.write_text('{"test_loss_before": 2.0}')
    else:
        metrics.unlink()
    stages_file = tmp_path / "run" / pipeline.STAGES_FILE
    record = json.loads(stages_file.read_text())
    record["stages"]["metrics"]["status"] = status
    stages_file.write_text(json.dumps(record))
    again, stages = do_run(settings, calls)
    assert stages == ["metrics"]
    assert dict(calls)["metrics"] == f"rebuilt from {tmp_path / 'run' / 'train'}"  # the kept run, on the loaded base
    assert json.loads(metrics.read_text()) == {k: first[k] for k in pipeline._METRIC_KEYS}
    assert again["test_loss_after"] == first["test_loss_after"]


def test_a_damaged_training_run_json_is_trained_again(setup, tmp_path):
    settings, calls = setup
    do_run(settings, calls)
    (tmp_path / "run" / "train" / "run.json").write_text("{truncated")
    _, stages = do_run(settings, calls)
    assert stages == ["train", "metrics", "export"] and dict(calls)["train"]["resume"] is False


@pytest.mark.parametrize("case", ["foreign metrics.json", "any foreign file", "out is a file", "damaged stages.json",
                                  "stage output without a record"])
def test_run_refuses_what_it_did_not_make(setup, tmp_path, capsys, case):
    settings, calls = setup
    out = tmp_path / "run"
    if case == "foreign metrics.json":
        out.mkdir()
        (out / "metrics.json").write_text('{"accuracy": 0.9}')
        needle = "was not made by `qradaptor run`"
    elif case == "any foreign file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        needle = "was not made by `qradaptor run`"
    elif case == "out is a file":
        out.write_text("mine")
        needle = "is not a directory"
    elif case == "damaged stages.json":
        do_run(settings, calls)
        (out / pipeline.STAGES_FILE).write_text('{"format": 1, "stag')
        needle = "is damaged"
    else:  # the user put a directory where a stage writes, and no stage record claims it
        do_run(settings, calls)
        shutil.rmtree(out / "model")
        record = json.loads((out / pipeline.STAGES_FILE).read_text())
        del record["stages"]["export"]
        (out / pipeline.STAGES_FILE).write_text(json.dumps(record))
        (out / "model").mkdir()
        (out / "model" / "notes.txt").write_text("mine")
        needle = "this run did not write it"
    before = snapshot(tmp_path)
    calls.clear()
    code, _, err = cli(capsys, "run", "--model", settings["model"], "--data", settings["data"], "--budget", "4bit",
                       "--out", out, "--trials", 3, "--steps", 4, "-q")
    assert_user_error(code, err, needle)
    assert snapshot(tmp_path) == before and [c for c in calls if c[0] != "profile"] == []


def test_run_tolerates_files_beside_its_stages(setup, tmp_path):
    """A run directory is the tool's, but what the user (or `demo`) keeps beside the stages is left alone."""
    settings, calls = setup
    do_run(settings, calls)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _, stages = do_run(settings, calls, budget="3bit")
    assert stages == ["search", "train", "metrics", "export"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- run, real stages
TINY_SEARCH = {"population": 4, "promote": 1, "refine": 1, "warm_start": 2,
               "cheap": {"name": "cheap", "steps": 2, "eval_blocks": 2},
               "full": {"name": "full", "steps": 2, "eval_blocks": 2}}


def test_a_lower_budget_gives_a_new_plan_trained_and_exported(tiny_dir, tmp_path):
    from qradaptor.backends import get_backend
    from qradaptor.memory import ModelShapes, predict
    from qradaptor.models import load_model
    from qradaptor.plan import Plan

    model, _ = load_model(str(tiny_dir))
    shapes, hqq = ModelShapes.from_model(model), get_backend("hqq")
    high = predict(shapes, Plan.uniform(4, 8, 16), hqq).total_bytes
    low = predict(shapes, Plan.uniform(4, 3, 4), hqq).total_bytes
    out = tmp_path / "run"
    kw = dict(data=words_file(tmp_path / "words.txt"), out=out, trials=4, steps=2, profile_tokens=64, seq_len=32,
              profile_dtype="float32", eval_blocks=2, search_settings=TINY_SEARCH,
              train_settings={"eval_blocks": 0, "dtype": "float32"}, progress=False)
    pipeline.run(str(tiny_dir), budget=high, **kw)
    profiled = (out / "profile" / "sensitivity.json").stat().st_mtime_ns
    assert predict(shapes, Plan.load(out / "search" / "plan.json"), hqq).total_bytes > low  # else nothing to show

    result = pipeline.run(str(tiny_dir), budget=low, **kw)
    plan = Plan.load(out / "search" / "plan.json")
    assert predict(shapes, plan, hqq).total_bytes <= low
    assert json.loads((out / "train" / "run.json").read_text())["plan"] == plan.to_dict()
    assert Plan.load(out / "model" / "plan.json").to_dict() == plan.to_dict()
    assert result["memory"]["predicted_bytes"] <= low
    assert (out / "profile" / "sensitivity.json").stat().st_mtime_ns == profiled


# ---------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny finished training run and its export."""
    from conftest import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=False)).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "p.json").write_text(json.dumps({"layers": [{"bits": b, "rank": 4} for b in (4, 2, 16, 3)]}))
    assert main(["train", "--model", str(root / "tiny"), "--plan", str(root / "p.json"), "--data",
                 words_file(root / "d.txt"), "--out", str(root / "run"), "--steps", "1", "--seq-len", "32",
                 "--eval-blocks", "0", "--dtype", "bfloat16", "-q"]) == 0  # bf16: F16 in the header is the same size
    assert main(["export", str(root / "run"), "--to", str(root / "out"), "-q"]) == 0
    return root


def test_export_lists_every_file_it_wrote_and_replaces_only_its_own(exported, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(exported / "out", out)
    files = json.loads((out / "qradaptor" / "export.json").read_text())["files"]
    assert set(files) == {str(p.relative_to(out)) + ("/" if p.is_dir() else "") for p in out.rglob("*")}
    assert main(["export", str(exported / "run"), "--to", str(out), "-q"]) == 0  # its own earlier export: replaced
    (out / "adapter" / "my-notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "export", exported / "run", "--to", out, "-q")
    assert_user_error(code, err, "adapter/my-notes.txt")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["bare export.json", "export.json without a file list", "damaged export.json"])
def test_export_never_deletes_a_directory_it_cannot_prove_it_wrote(exported, tmp_path, capsys, case):
    target = tmp_path / "target"
    (target / "qradaptor").mkdir(parents=True)
    if case == "bare export.json":
        (target / "qradaptor" / "export.json").write_text("{}")
    elif case == "export.json without a file list":  # e.g. an export written before the list existed
        info = json.loads((exported / "out" / "qradaptor" / "export.json").read_text())
        del info["files"]
        (target / "qradaptor" / "export.json").write_text(json.dumps(info))
    else:
        (target / "qradaptor" / "export.json").write_bytes(b"\x00\x01")
    (target / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "export", exported / "run", "--to", target, "-q")
    assert_user_error(code, err, "not an earlier export")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", [b"{truncat", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_export_of_a_run_with_a_damaged_metrics_json_says_so(exported, tmp_path, capsys, damage):
    shutil.copytree(exported / "run", tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_bytes(damage)
    code, _, err = cli(capsys, "export", tmp_path / "run", "--to", tmp_path / "out", "-q")
    assert_user_error(code, err, "metrics.json is damaged")
    assert not (tmp_path / "out").exists()
    (tmp_path / "run" / "metrics.json").unlink()  # the way out the fix names
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out"), "-q"]) == 0


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _rename(header, keys_only=False):
    old, new = "model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj_renamed"
    for key in [k for k in header if k.startswith(old + ".")]:
        header[key.replace(old, new)] = header.pop(key)
    if not keys_only:
        modules = json.loads(header["__metadata__"]["modules"])
        modules[new] = modules.pop(old)
        header["__metadata__"]["modules"] = json.dumps(modules)


def _edit_entry(suffix, field, value):
    def edit(header):
        key = next(k for k in header if k.endswith(suffix))
        header[key][field] = value(header[key][field])
    return edit


def _swap_shape_values(path):
    """The stored (out, in) of one module swapped: same byte count, the wrong matrix."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.down_proj.shape"
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path, metadata=meta)


TAMPER = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-300]), "is unreadable"),
    "empty": (lambda p: p.write_bytes(b""), "is unreadable"),
    "tensor shape changed": (lambda p: _rewrite_header(p, _edit_entry("down_proj.scale", "shape", lambda s: s[::-1])),
                             "down_proj.scale"),
    "tensor dtype changed": (lambda p: _rewrite_header(p, _edit_entry("down_proj.scale", "dtype",
                                                                      lambda d: "F16" if d != "F16" else "F32")),
                             "down_proj.scale is stored as torch.float16"),
    "stored matrix shape changed": (_swap_shape_values, "is stored as 128x64, but the model's is 64x128"),
    "module renamed": (lambda p: _rewrite_header(p, _rename), "module names changed"),
    "tensor keys renamed": (lambda p: _rewrite_header(p, lambda h: _rename(h, keys_only=True)), "lacks the tensor"),
    "unknown compute dtype": (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(compute_dtype="int3")),
                              "unknown compute dtype"),
    "module list not JSON": (lambda p: _rewrite_header(p, lambda h: h["__metadata__"].update(modules="{")),
                             "is unreadable"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_tampered_packed_file_is_refused_clearly(exported, tmp_path, capsys, case):
    import qradaptor
    from qradaptor.errors import ArtifactError

    out = tmp_path / "out"
    shutil.copytree(exported / "out", out)
    tamper, needle = TAMPER[case]
    tamper(out / "qradaptor" / "quantized.safetensors")
    with pytest.raises(ArtifactError, match="quantized.safetensors") as e:
        qradaptor.load(out)
    assert needle in e.value.cause and e.value.fix
    code, _, err = cli(capsys, "generate", out, "--prompt", "w1 w2", "--max-new-tokens", 2, "-q")
    assert_user_error(code, err, needle)
    code, _, err = cli(capsys, "evaluate", "--model", out, "--data", exported / "d.txt", "--seq-len", 32,
                       "--max-blocks", 1, "-q")
    assert_user_error(code, err, needle)


def test_an_untampered_export_still_loads(exported):
    import qradaptor

    model = qradaptor.load(exported / "out")
    assert model.base_model.model.model.layers[2].mlp.down_proj.base_layer.__class__ is torch.nn.Linear  # 16 bits
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(2, 20)[None]).logits).all()
