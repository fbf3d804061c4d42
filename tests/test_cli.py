"""The CLI end to end on a tiny model: output keys, and every bad input gets one clear message, exit 2,
no traceback, and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qradaptor.cli import main


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    d = tmp_path / "work"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def write_plan(path, bits, rank=8):
    path.write_text(json.dumps({"layers": [{"bits": b, "rank": rank} for b in bits]}))
    return str(path)


def words_file(path, n_lines=40):
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(n_lines)))
    return str(path)


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_subcommand(capsys):
    code = main(["--help"])
    out = capsys.readouterr().out
    assert code == 0
    for command in ("memory", "evaluate", "demo"):
        assert command in out


def test_memory_json_predicted_and_measured(capsys, tiny_dir, workdir):
    plan = write_plan(workdir / "p.json", [2, 3, 4, 8])
    code, out, _ = run(capsys, "memory", "--model", str(tiny_dir), "--plan", plan, "--measure", "--json")
    report = json.loads(out)
    assert code == 0
    assert abs(report["measured_bytes"] - report["predicted_bytes"]) / report["predicted_bytes"] < 0.01
    assert report["avg_bits"] > report["code_bits"] == pytest.approx((2 + 3 + 4 + 8) / 4)


def test_memory_budget_verdict(capsys, tiny_dir, workdir):
    four = write_plan(workdir / "four.json", [4] * 4, rank=16)
    eight = write_plan(workdir / "eight.json", [8] * 4, rank=16)
    _, out, _ = run(capsys, "memory", "--model", str(tiny_dir), "--plan", four, "--budget", "4bit", "--json")
    assert json.loads(out)["fits"] is True
    _, out, _ = run(capsys, "memory", "--model", str(tiny_dir), "--plan", eight, "--budget", "4bit")
    assert "does NOT fit" in out


def test_memory_prints_the_training_peak_and_checks_a_training_budget(capsys, tiny_dir, workdir):
    plan = write_plan(workdir / "four.json", [4] * 4, rank=16)
    _, out, _ = run(capsys, "memory", "--model", str(tiny_dir), "--plan", plan, "--batch-size", "8", "--seq-len",
                    "128", "--no-gradient-checkpointing", "--json")
    training = json.loads(out)["training"]
    assert (training["batch_size"], training["seq_len"], training["checkpointing"]) == (8, 128, False)
    peak = training["peak_bytes"]
    _, out, _ = run(capsys, "memory", "--model", str(tiny_dir), "--plan", plan, "--batch-size", "8", "--seq-len",
                    "128", "--no-gradient-checkpointing", "--budget", f"train:{peak - 1}")
    assert "training peak:" in out and "does NOT fit" in out and "fits with --batch-size" in out
    _, out, _ = run(capsys, "memory", "--model", str(tiny_dir), "--plan", plan, "--budget", f"train:{10 * peak}",
                    "--json")
    assert json.loads(out)["fits"] is True


def test_train_refuses_a_batch_over_the_training_budget_before_writing(capsys, tiny_dir, workdir):
    plan = write_plan(workdir / "p.json", [4] * 4)
    data = words_file(workdir / "d.txt")
    code, _, err = run(capsys, "train", "--model", str(tiny_dir), "--plan", plan, "--data", data, "--seq-len", "16",
                       "--batch-size", "8", "--steps", "1", "--budget", "train:100MB", "--out", "r")
    assert code == 2 and "training-memory budget" in err and "fix:" in err
    assert not (workdir / "r").exists()


def test_evaluate_json(capsys, tiny_dir, workdir):
    data = words_file(workdir / "d.txt")
    code, out, _ = run(capsys, "evaluate", "--model", str(tiny_dir), "--data", data, "--split", "train",
                       "--seq-len", "32", "--json", "-q")
    result = json.loads(out)
    assert code == 0 and result["tokens"] > 0 and result["perplexity"] > 1
    plan = write_plan(workdir / "p.json", [2] * 4)
    _, out, _ = run(capsys, "evaluate", "--model", str(tiny_dir), "--data", data, "--split", "train",
                    "--seq-len", "32", "--plan", plan, "--json", "-q")
    assert json.loads(out)["loss"] != result["loss"]  # 2-bit weights change the predictions


BAD_INPUTS = {
    "missing model path": (["memory", "--model", "./no/such/model", "--plan", "{plan4}"], "not found"),
    "file that is not a model": (["memory", "--model", "{text}", "--plan", "{plan4}"], "is not a model"),
    "model path in a symlink loop": (["memory", "--model", "{loop}", "--plan", "{plan4}"], "cannot read model path"),
    "malformed JSONL line": (["evaluate", "--model", "{model}", "--data", "{badjsonl}"], "line 2"),
    "empty dataset": (["evaluate", "--model", "{model}", "--data", "{empty}"], "empty"),
    "binary data file": (["evaluate", "--model", "{model}", "--data", "{binary}"], "binary, not text"),
    "Latin-1 data file": (["evaluate", "--model", "{model}", "--data", "{latin1}"], "not UTF-8"),
    "UTF-16 data file": (["evaluate", "--model", "{model}", "--data", "{utf16}"], "UTF-16"),
    "UTF-16 plan file": (["memory", "--model", "{model}", "--plan", "{plan_utf16}"], "UTF-16"),
    "Latin-1 plan file": (["memory", "--model", "{model}", "--plan", "{plan_latin1}"], "not UTF-8"),
    "unknown bit-width in plan": (["memory", "--model", "{model}", "--plan", "{plan9}"], "9-bit"),
    "layer count mismatch": (["memory", "--model", "{model}", "--plan", "{plan3layers}"], "3 layers"),
    "plan alpha_ratio Infinity": (["memory", "--model", "{model}", "--plan", "{plan_inf}"], "alpha_ratio"),
    "plan group_size true": (["memory", "--model", "{model}", "--plan", "{plan_bool}"], "group_size"),
    "bit-width the backend lacks": (["memory", "--model", "{model}", "--plan", "{plan5}", "--backend", "hqq-native"],
                                    "cannot store 5-bit"),
    "budget below the cheapest plan": (["memory", "--model", "{model}", "--plan", "{plan4}", "--budget", "1kB"],
                                       "cheapest possible plan"),
    "unreadable budget": (["memory", "--model", "{model}", "--plan", "{plan4}", "--budget", "lots"], "budget"),
    "budget too large for a float": (["memory", "--model", "{model}", "--plan", "{plan4}", "--budget", "1e400GB"],
                                     "budget"),
    "missing plan file": (["memory", "--model", "{model}", "--plan", "nope.json"], "plan file not found"),
    "truncated safetensors": (["evaluate", "--model", "{truncated}", "--data", "{text}"], "cannot load"),
    "empty safetensors": (["evaluate", "--model", "{emptyweights}", "--data", "{text}"], "cannot load"),
    "garbage safetensors": (["evaluate", "--model", "{garbage}", "--data", "{text}"], "cannot load"),
    "tensor of the wrong shape": (["evaluate", "--model", "{wrongshape}", "--data", "{text}"], "wrong shape"),
    "tensor missing from the model": (["evaluate", "--model", "{missing}", "--data", "{text}"], "missing"),
    "pickled weights only": (["evaluate", "--model", "{pickled}", "--data", "{text}"], "safetensors only"),
    "--bits abc": (["profile", "--model", "{model}", "--bits", "abc", "--out", "o"], "--bits"),
    "--bits 2,,4": (["profile", "--model", "{model}", "--bits", "2,,4", "--out", "o"], "--bits"),
    "--bits 2,16 in profile": (["profile", "--model", "{model}", "--data", "{text}", "--bits", "2,16", "--out", "o"],
                               "cannot profile bits [16]"),
    "--ranks abc": (["search", "--model", "{model}", "--budget", "4bit", "--ranks", "abc", "--out", "o"], "--ranks"),
    "--group-size 0": (["profile", "--model", "{model}", "--group-size", "0", "--out", "o"], "--group-size"),
    "--lr -1": (["train", "--model", "{model}", "--plan", "{plan4}", "--lr", "-1", "--out", "o"], "--lr"),
    "--lr nan": (["train", "--model", "{model}", "--plan", "{plan4}", "--lr", "nan", "--out", "o"], "--lr"),
    "--lr inf": (["train", "--model", "{model}", "--plan", "{plan4}", "--lr", "inf", "--out", "o"], "--lr"),
    "--checkpoint-every 0": (["train", "--model", "{model}", "--plan", "{plan4}", "--checkpoint-every", "0",
                              "--out", "o"], "--checkpoint-every"),
    "--max-new-tokens 0": (["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    "empty --prompt": (["generate", "{model}", "--prompt", "  "], "--prompt"),
    "train --out is a file": (["train", "--model", "{model}", "--plan", "{plan4}", "--data", "{text}",
                               "--out", "{text}"], "is a file"),
    "train --out under a file": (["train", "--model", "{model}", "--plan", "{plan4}", "--data", "{text}",
                                  "--out", "{text}/run"], "is a file"),
    "profile --out is a file": (["profile", "--model", "{model}", "--data", "{text}", "--out", "{text}"], "is a file"),
    "memory --batch-size 0": (["memory", "--model", "{model}", "--plan", "{plan4}", "--batch-size", "0"],
                              "--batch-size"),
    "unreadable training budget": (["memory", "--model", "{model}", "--plan", "{plan4}", "--budget", "train:lots"],
                                   "training-memory budget"),
    "negative training budget": (["train", "--model", "{model}", "--plan", "{plan4}", "--data", "{text}",
                                  "--budget", "train:-1GiB", "--out", "o"], "training-memory budget"),
    "data shorter than one block": (["profile", "--model", "{model}", "--data", "{short}", "--out", "o"],
                                    "pass a smaller --seq-len"),
}


def _damaged_models(inputs, tiny_dir) -> dict:
    """Copies of the tiny model with damaged weights, one per way a download or a hand edit goes wrong."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    weights = (tiny_dir / "model.safetensors").read_bytes()
    state = load_file(tiny_dir / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    edits = {
        "truncated": lambda p: p.write_bytes(weights[: len(weights) // 2]),
        "emptyweights": lambda p: p.write_bytes(b""),
        "garbage": lambda p: p.write_bytes(bytes(range(256)) * 20),
        "wrongshape": lambda p: save_file({**state, key: torch.zeros(32, 64)}, p, metadata={"format": "pt"}),
        "missing": lambda p: save_file({k: v for k, v in state.items() if k != key}, p, metadata={"format": "pt"}),
        "pickled": lambda p: (torch.save(state, p.with_name("pytorch_model.bin")), p.unlink()),
    }
    for name, edit in edits.items():
        target = inputs / name
        shutil.copytree(tiny_dir, target)
        edit(target / "model.safetensors")
        out[name] = str(target)
    return out


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_message_exit_2_nothing_written(capsys, tiny_dir, tmp_path, workdir, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    plan = {"layers": [{"bits": 4, "rank": 8}] * 4}
    files = {
        "model": str(tiny_dir),
        "plan4": write_plan(inputs / "plan4.json", [4] * 4),
        "plan9": write_plan(inputs / "plan9.json", [9] * 4),
        "plan5": write_plan(inputs / "plan5.json", [5] * 4),
        "plan3layers": write_plan(inputs / "plan3.json", [4] * 3),
        "text": words_file(inputs / "notes.txt"),
        "empty": str(inputs / "empty.jsonl"),
        "badjsonl": str(inputs / "bad.jsonl"),
        "binary": str(inputs / "binary.txt"),
        "latin1": str(inputs / "latin1.txt"),
        "utf16": str(inputs / "utf16.txt"),
        "plan_utf16": str(inputs / "plan16.json"),
        "plan_latin1": str(inputs / "planl1.json"),
        "plan_inf": str(inputs / "planinf.json"),
        "plan_bool": str(inputs / "planbool.json"),
        "loop": str(inputs / "loop"),
    }
    (inputs / "empty.jsonl").write_text("")
    files["short"] = str(inputs / "short.txt")
    (inputs / "short.txt").write_text("w1 w2 w3 w4\n\nw5 w6")
    (inputs / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"text": oops}\n')
    (inputs / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (inputs / "latin1.txt").write_bytes("w1 w2 café w3\n\nw4 w5".encode("latin-1"))
    (inputs / "utf16.txt").write_bytes("w1 w2 w3\n\nw4 w5".encode("utf-16"))
    (inputs / "plan16.json").write_bytes(json.dumps(plan).encode("utf-16"))
    (inputs / "planl1.json").write_bytes(json.dumps({**plan, "note": "é"}, ensure_ascii=False).encode("latin-1"))
    (inputs / "planinf.json").write_text(json.dumps({**plan, "alpha_ratio": float("inf")}))  # writes Infinity
    (inputs / "planbool.json").write_text(json.dumps({**plan, "group_size": True}))
    os.symlink(inputs / "loop", inputs / "loop")
    argv, needle = BAD_INPUTS[case]
    if any("{" + name + "}" in a for a in argv for name in ("truncated", "emptyweights", "garbage", "wrongshape",
                                                            "missing", "pickled")):
        files.update(_damaged_models(inputs, tiny_dir))
    before = sorted(os.listdir(workdir)), sorted(os.listdir(inputs))
    code, out, err = run(capsys, *[a.format(**files) for a in argv])
    assert code == 2, err
    assert needle in err and "fix:" in err and "Traceback" not in err, err
    assert err.startswith("qradaptor: error:")
    assert len(err.strip().splitlines()) == 2, err  # the error line and the fix line, nothing else
    assert (sorted(os.listdir(workdir)), sorted(os.listdir(inputs))) == before


def test_installed_entry_point_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qradaptor.cli", "memory", "--model", str(tmp_path / "nope"),
                           "--plan", "p.json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_during_a_search_is_one_line_without_optunas_traceback(capfd, tiny_dir, tmp_path, workdir, monkeypatch):
    import importlib

    search_module = importlib.import_module("qradaptor.search")  # the attribute is the function

    def interrupted(self, plan, fidelity):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_module.FineTuneFitness, "__call__", interrupted)
    data = words_file(tmp_path / "d.txt", n_lines=200)
    capfd.readouterr()
    code = main(["search", "--model", str(tiny_dir), "--data", data, "--budget", "4bit", "--trials", "2",
                 "--population", "2", "--seq-len", "32", "--out", str(workdir / "s"), "-q"])
    err = capfd.readouterr().err
    assert code == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line] == \
        [line for line in err.splitlines() if line.startswith("qradaptor: interrupted")], err


@pytest.mark.parametrize("edit, needle", [(lambda d: d.update(layers=3, kl=d["kl"][:3], weight_error=d["weight_error"][:3]),
                                           "profiles 3 decoder layers but the model has 4"),
                                          (lambda d: d["kl"][0].update({"2": float("nan")}), "KL nan at 2 bits"),
                                          (lambda d: d["kl"][1].update({"2": -1.0}), "KL -1.0 at 2 bits")])
def test_search_refuses_a_sensitivity_file_that_does_not_fit(capsys, tiny_dir, tmp_path, workdir, edit, needle):
    from qradaptor.profile import FORMAT

    profile = {"format": FORMAT, "model_fingerprint": "x", "data_fingerprint": "y", "bits": [2], "layers": 4,
               "kl": [{"2": 0.1}] * 4, "weight_error": [{"2": 0.01, "8": 0.001}] * 4}
    edit(profile)
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(profile))
    code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--data", words_file(tmp_path / "d.txt"),
                       "--budget", "4bit", "--sensitivity", str(path), "--out", str(workdir / "s"), "-q")
    assert code == 2 and needle in err and "fix:" in err and "Traceback" not in err, err


def test_search_profiles_with_its_own_block_length(capsys, tiny_dir, tmp_path, workdir):
    # 12 paragraphs of 30 words: too short for the profile's default 256-token blocks, fine at --seq-len 32
    data = words_file(tmp_path / "d.txt", n_lines=12)
    code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--data", data, "--budget", "4bit", "--trials", "2",
                       "--population", "2", "--promote", "1", "--refine", "0", "--seq-len", "32",
                       "--out", str(workdir / "s"), "-q")
    assert code == 0, err
    settings = json.loads((workdir / "s" / "sensitivity.json").read_text())["settings"]
    assert settings["seq_len"] == 32 and settings["backend"] == "hqq"
    # the prior's price of rank, given on the command line, reaches the search and is recorded; the same study
    # asked at another price is another search, refused (naming the field), nothing changed
    code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--data", data, "--budget", "4bit", "--trials",
                       "2", "--population", "2", "--promote", "1", "--refine", "0", "--seq-len", "32",
                       "--rank-value", "2.5", "--out", str(workdir / "priced"), "-q")
    assert code == 0, err
    priced = json.loads((workdir / "priced" / "pareto.json").read_text())["settings"]
    assert priced["rank_value"] == 2.5 and priced["recovered_bits"] == 4  # the default with the activation start
    before = (workdir / "priced" / "pareto.json").read_bytes()
    code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--data", data, "--budget", "4bit", "--trials",
                       "2", "--population", "2", "--promote", "1", "--refine", "0", "--seq-len", "32",
                       "--rank-value", "0.5", "--out", str(workdir / "priced"), "-q")
    assert code == 2 and "rank_value" in err and "Traceback" not in err, err
    assert (workdir / "priced" / "pareto.json").read_bytes() == before
    code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--budget", "4bit", "--rank-value", "0",
                       "--out", str(workdir / "bad"))
    assert code == 2 and "--rank-value" in err and "Traceback" not in err, err
    for bad in ("9", "1", "four"):
        code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--budget", "4bit", "--recovered-bits", bad,
                           "--out", str(workdir / "bad"))
        assert code == 2 and "--recovered-bits" in err and "Traceback" not in err, err
    assert not (workdir / "bad").exists()


def test_a_search_on_the_final_schedule_keeps_the_run_that_train_continues(capsys, tiny_dir, tmp_path, workdir):
    """`search --final-steps N` measures plans on the first steps of `train --steps N`'s schedule and keeps the
    chosen plan's run; `train --init-from` continues it, and refuses (naming the field) a fine-tune of another dtype."""
    data = words_file(tmp_path / "d.txt", n_lines=60)
    code, out, err = run(capsys, "search", "--model", str(tiny_dir), "--data", data, "--budget", "4bit",
                         "--trials", "2", "--population", "2", "--promote", "1", "--refine", "0", "--seq-len", "32",
                         "--final-steps", "24", "--dtype", "bfloat16", "--out", str(workdir / "s"), "-q")
    assert code == 0, err
    pareto = json.loads((workdir / "s" / "pareto.json").read_text())
    assert pareto["settings"]["dtype"] == "bfloat16" and pareto["kept_step"] >= 1, pareto
    kept = str(workdir / "s" / pareto["kept_run"])
    assert f"--init-from {kept}" in out
    common = ["train", "--model", str(tiny_dir), "--data", data, "--plan", str(workdir / "s" / "plan.json"),
              "--steps", "24", "--seq-len", "32", "--eval-blocks", "0", "--init-from", kept, "-q"]
    code, _, err = run(capsys, *common, "--dtype", "float32", "--out", str(workdir / "t32"))
    assert code == 2 and "dtype" in err and "Traceback" not in err, err
    code, _, err = run(capsys, *common, "--out", str(workdir / "t"))
    assert code == 0, err
    record = json.loads((workdir / "t" / "run.json").read_text())
    assert record["initialised_from"]["step"] == pareto["kept_step"]
    # the search priced the plan as the bf16 fine-tune stores it (bf16 scales and zeros): the bytes it chose under
    # the budget are the trained model's
    memory = json.loads((workdir / "t" / "metrics.json").read_text())["memory"]
    assert pareto["chosen"]["memory_bytes"] == memory["predicted_bytes"] == memory["measured_bytes"], (pareto, memory)


def test_a_search_at_its_own_rate_keeps_a_run_that_a_fine_tune_at_that_rate_continues(capsys, tiny_dir, tmp_path,
                                                                                      workdir):
    """`search --final-steps N --search-lr LR`: the kept run is the beginning of a fine-tune at LR, which the summary
    names; `train --init-from` refuses it at the default rate (naming lr) and continues it at LR."""
    data = words_file(tmp_path / "d.txt", n_lines=60)
    code, out, err = run(capsys, "search", "--model", str(tiny_dir), "--data", data, "--budget", "4bit",
                         "--trials", "2", "--population", "2", "--promote", "1", "--refine", "0", "--seq-len", "32",
                         "--final-steps", "24", "--search-lr", "3e-3", "--out", str(workdir / "s"), "-q")
    assert code == 0, err
    pareto = json.loads((workdir / "s" / "pareto.json").read_text())
    assert pareto["settings"]["cheap"]["lr"] == pareto["settings"]["full"]["lr"] == 3e-3 and pareto["kept_step"] >= 1
    kept = str(workdir / "s" / pareto["kept_run"])
    assert f"train --lr 0.003 --init-from {kept}" in out
    common = ["train", "--model", str(tiny_dir), "--data", data, "--plan", str(workdir / "s" / "plan.json"),
              "--steps", "24", "--seq-len", "32", "--eval-blocks", "0", "--init-from", kept, "-q"]
    code, _, err = run(capsys, *common, "--out", str(workdir / "t0"))
    assert code == 2 and "lr" in err and "Traceback" not in err, err
    code, _, err = run(capsys, *common, "--lr", "3e-3", "--out", str(workdir / "t"))
    assert code == 0, err
    assert json.loads((workdir / "t" / "run.json").read_text())["initialised_from"]["step"] == pareto["kept_step"]
    code, _, err = run(capsys, "search", "--model", str(tiny_dir), "--budget", "4bit", "--search-lr", "0",
                       "--out", str(workdir / "bad"))
    assert code == 2 and "--search-lr" in err and "Traceback" not in err, err
