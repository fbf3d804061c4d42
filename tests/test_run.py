"""Training runs (checkpoints, exact resume), export, loading and generation, on a tiny model; bad input gets one
clear message, exit 2, and loses nothing."""

from __future__ import annotations

import errno
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qradaptor.cli import main

train_module = importlib.import_module("qradaptor.train")  # `qradaptor.train` the attribute is the loop function
train_command = importlib.import_module("qradaptor.commands.train")
export_command = importlib.import_module("qradaptor.commands.export")

PLAN = [(4, 8), (2, 4), (8, 8), (3, 16)]  # mixed bits and ranks: rank_pattern must carry layers 1 and 3
# fp32: these tests check exact equalities (resumed losses, stock-loaded logits to 1e-3); the default bf16
# compute is covered by test_default_bf16_run_trains_exports_and_loads.
TRAIN_ARGS = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "2",
              "--eval-blocks", "2", "--eval-every", "3", "--checkpoint-every", "2", "--dtype", "float32", "-q"]


def write_plan(path, layers=PLAN):
    path.write_text(json.dumps({"layers": [{"bits": b, "rank": r} for b, r in layers]}))
    return str(path)


def words_file(path, n_lines=40):
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(n_lines)))
    return str(path)


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(path):
    """Every file under ``path`` with its bytes: to prove that nothing was lost or changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_user_error(code, err, needle):
    assert code == 2, err
    assert err.startswith("qradaptor: error:") and needle in err and "fix:" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model, its data and plan, one finished training run and its export (with --merge)."""
    from conftest import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("run")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    files = {"model": str(root / "tiny"), "data": words_file(root / "d.txt"), "plan": write_plan(root / "p.json"),
             "run": root / "run", "out": root / "OUT", "root": root}
    assert main(["train", "--model", files["model"], "--plan", files["plan"], "--data", files["data"],
                 "--out", str(files["run"]), *TRAIN_ARGS]) == 0
    assert main(["export", str(files["run"]), "--to", str(files["out"]), "--merge", "-q"]) == 0
    return files


def interrupt_at_forward(monkeypatch, n):
    """Make the n-th training forward raise KeyboardInterrupt (Ctrl-C); returns the real function."""
    real = train_module.token_nll
    count = {"n": 0}

    def interrupt(*args, **kwargs):
        count["n"] += 1
        if count["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "token_nll", interrupt)
    return real


def train_argv(trained, out, *extra):
    return ["train", "--model", trained["model"], "--plan", trained["plan"], "--data", trained["data"],
            "--out", str(out), *TRAIN_ARGS, *extra]


# ---------------------------------------------------------------------------------------------- train
def test_run_directory_holds_config_versions_fingerprint_and_metrics(trained):
    run_dir = trained["run"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["seed"] == 0 and len(run["model_fingerprint"]) == 64
    assert run["config"]["steps"] == 6 and run["config"]["lr"] == 1e-2 and run["config"]["model"] == trained["model"]
    assert {"torch", "transformers", "peft", "hqq", "qradaptor"} <= set(run["versions"])
    assert run["training_estimate"]["peak_bytes"] > run["training_estimate"]["weights_bytes"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["train_losses"]) == 6 and [e[0] for e in metrics["evals"]] == [3, 6]
    assert metrics["validation"]["tokens"] > 0
    assert metrics["memory"]["measured_bytes"] == metrics["memory"]["predicted_bytes"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "predicted training peak" in (run_dir / "train.log").read_text()
    # Only the latest checkpoint is kept, and it holds nothing pickled.
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    assert ckpt.name == "step-000006"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= names
    assert all(n.endswith((".json", ".safetensors", ".md")) for n in names)


def test_training_memory_estimate_is_shown_before_training(trained, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="qradaptor")
    seen = []
    real = train_module.train

    def spy(*args, **kwargs):
        seen.extend(r.getMessage() for r in caplog.records)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_command, "train", spy)
    assert main([a for a in train_argv(trained, tmp_path / "r") if a != "-q"]) == 0
    assert any("predicted training peak" in m for m in seen)


def test_interrupted_run_resumes_to_the_same_final_loss(trained, tmp_path, capsys, monkeypatch):
    real = interrupt_at_forward(monkeypatch, 5)  # one forward a step; step 5 comes after the checkpoint at step 4
    code, _, err = run(capsys, *train_argv(trained, tmp_path / "r"))
    assert code == 130 and "interrupted" in err
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-000004"]
    assert not (tmp_path / "r" / "adapter").exists()
    monkeypatch.setattr(train_module, "token_nll", real)

    code, out, _ = run(capsys, "train", "--out", tmp_path / "r", "--resume", "-q")  # settings come from run.json
    assert code == 0 and "resumed at step 4" in out
    resumed = json.loads((tmp_path / "r" / "metrics.json").read_text())
    straight = json.loads((trained["run"] / "metrics.json").read_text())
    assert resumed["train_losses"] == straight["train_losses"]  # exactly, not approximately
    assert resumed["evals"] == straight["evals"] and resumed["validation"] == straight["validation"]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["resumed"][0]["from_step"] == 4


def test_train_state_round_trips_through_safetensors_and_json(tmp_path):
    opt_param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([opt_param], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    opt_param.grad = torch.ones_like(opt_param)
    opt.step()
    sched.step()
    state = train_module.TrainState(step=1, losses=[1.25], evals=[(1, 2.5)], optimizer=opt.state_dict(),
                                    scheduler=sched.state_dict(), rng=torch.get_rng_state())
    train_module.save_train_state(state, tmp_path)
    back = train_module.load_train_state(tmp_path)
    assert back.step == 1 and back.losses == [1.25] and back.evals == [(1, 2.5)]
    assert torch.equal(back.rng, state.rng) and back.scheduler == state.scheduler
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], state.optimizer["state"][0]["exp_avg"])
    opt.load_state_dict(back.optimizer)  # loads cleanly into a fresh optimizer


def test_resume_with_a_changed_setting_is_refused_and_names_it(trained, tmp_path, capsys, monkeypatch):
    real = interrupt_at_forward(monkeypatch, 5)
    assert main(train_argv(trained, tmp_path / "r")) == 130
    monkeypatch.setattr(train_module, "token_nll", real)
    before = snapshot(tmp_path / "r")
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--resume", "--lr", "0.02", "-q")
    assert_user_error(code, err, "lr 0.01 → 0.02")
    other = write_plan(tmp_path / "other.json", [(4, 8)] * 4)
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--resume", "--plan", other, "-q")
    assert_user_error(code, err, "plan differs")
    code, _, err = run(capsys, "train", "--out", tmp_path / "r", "--resume", "--steps", "7", "-q")
    assert_user_error(code, err, "steps 6 → 7")
    assert snapshot(tmp_path / "r") == before


@pytest.mark.parametrize("case", ["plan for another model", "existing run without --resume",
                                  "resume without a run", "resume a finished run"])
def test_train_bad_input(trained, tmp_path, capsys, case):
    if case == "plan for another model":
        plan = write_plan(tmp_path / "p3.json", PLAN[:3])
        argv = ["train", "--model", trained["model"], "--plan", plan, "--data", trained["data"],
                "--out", tmp_path / "new", "-q"]
        needle = "3 layers but the model has 4"
    elif case == "existing run without --resume":
        argv, needle = train_argv(trained, trained["run"]), "already holds a training run"
    elif case == "resume without a run":
        argv, needle = ["train", "--out", tmp_path / "nothing", "--resume", "-q"], "nothing to resume"
    else:
        argv, needle = ["train", "--out", trained["run"], "--resume", "-q"], "already finished"
    before = snapshot(trained["root"]), sorted(os.listdir(tmp_path))
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, needle)
    assert (snapshot(trained["root"]), sorted(os.listdir(tmp_path))) == before


# ---------------------------------------------------------------------------------------------- export / load
STOCK_PROGRAM = textwrap.dedent('''
    import sys
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # the README's program: the export's dtype
    model = PeftModel.from_pretrained(model, f"{out}/adapter").eval()
    ids = tokenizer(sys.argv[2], return_tensors="pt")["input_ids"]
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert not any(name == "qradaptor" or name.startswith("qradaptor.") for name in sys.modules)
    save_file({"logits": logits.contiguous(), "ids": ids}, sys.argv[3])
    print(repr(ranks))
''')


def run_stock_program(out, text, result_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK_PROGRAM, str(out), text, str(result_path)],
                          capture_output=True, text=True, env=env, cwd=result_path.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    return load_file(result_path), eval(proc.stdout.strip().splitlines()[-1])


def test_export_layout(trained):
    out = trained["out"]
    assert {"config.json", "model.safetensors", "plan.json", "README.md", "adapter", "qradaptor", "merged",
            "tokenizer.json"} <= set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "adapter"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    for needle in ("| 1 | 2 | 4 |", "predicted", "validation loss", "PeftModel.from_pretrained"):
        assert needle in card
    from safetensors import safe_open

    with safe_open(out / "qradaptor" / "quantized.safetensors", "pt") as f:
        meta = f.metadata()
    modules = json.loads(meta["modules"])
    assert meta["backend"] == "hqq" and len(modules) == 4 * 7
    assert modules["model.layers.1.mlp.down_proj"]["bits"] == 2 and modules["model.layers.3.self_attn.q_proj"]["bits"] == 3


def test_stock_transformers_and_peft_reproduce_qradaptor_load(trained, tmp_path):
    import qradaptor

    got, ranks = run_stock_program(trained["out"], "w1 w5 w9 w13 w17 w21 w25 w29", tmp_path / "stock.safetensors")
    model = qradaptor.load(trained["out"])
    with torch.no_grad():
        ours = model(input_ids=got["ids"]).logits
    assert ours.dtype == got["logits"].dtype == torch.float32 and torch.equal(ours, got["logits"])  # an fp32 export
    # rank_pattern's regex-escaped full names survive the stock load: every module has its layer's rank
    for name, rank in ranks.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        assert rank == PLAN[layer][1], name
    assert len(ranks) == 4 * 7
    # the trained adapter is really there: without it the logits differ
    with model.disable_adapter(), torch.no_grad():
        assert (model(input_ids=got["ids"]).logits - ours).abs().max().item() > 1e-4


AUTO_PEFT_PROGRAM = textwrap.dedent('''
    import sys
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import save_file

    model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").eval()
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        save_file({"logits": model(input_ids=ids).logits.contiguous()}, sys.argv[2])
''')


def test_peft_auto_classes_load_the_exports_own_base(trained, tmp_path):
    """The adapter names the export as its base: PEFT's auto class loads the dequantized base beside it, not the
    unquantized model the run was trained from (here an absolute path that still exists), from any directory."""
    import qradaptor

    config = json.loads((trained["out"] / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == trained["out"].resolve()
    result = tmp_path / "auto.safetensors"
    proc = subprocess.run([sys.executable, "-c", AUTO_PEFT_PROGRAM, str(trained["out"] / "adapter"), str(result)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        ours = qradaptor.load(trained["out"])(input_ids=ids).logits
    assert torch.equal(load_file(result)["logits"], ours)
    # the run's own adapter still names the model it was trained from
    run_config = json.loads((trained["run"] / "adapter" / "adapter_config.json").read_text())
    assert run_config["base_model_name_or_path"] != config["base_model_name_or_path"]


def test_reloaded_export_holds_the_predicted_bytes(trained):
    import qradaptor
    from qradaptor.memory import ModelShapes, measured_bytes, predict
    from qradaptor.plan import Plan

    model = qradaptor.load(trained["out"])
    backend = qradaptor.get_backend("hqq")
    predicted = predict(ModelShapes.from_config(model.config), Plan.load(trained["out"] / "plan.json"), backend)
    assert measured_bytes(model) == predicted.total_bytes
    assert backend.is_quantized(model.base_model.model.model.layers[1].mlp.down_proj.base_layer)


def test_merged_model_loads_with_from_pretrained_alone(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qradaptor

    merged = AutoModelForCausalLM.from_pretrained(trained["out"] / "merged", dtype=torch.float32).eval()
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - qradaptor.load(trained["out"])(input_ids=ids).logits).abs().max()
    assert diff.item() < 1e-3


def test_run_dir_loads_like_its_export(trained):
    import qradaptor

    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        a = qradaptor.load(trained["run"])(input_ids=ids).logits
        b = qradaptor.load(trained["out"])(input_ids=ids).logits
    assert torch.equal(a, b)


def test_export_with_the_reference_backend(trained, tmp_path):
    import qradaptor
    from qradaptor.memory import ModelShapes, measured_bytes, predict
    from qradaptor.plan import Plan

    run_dir = tmp_path / "r"
    qradaptor.train_plan(run_dir, plan={"layers": [{"bits": b, "rank": r} for b, r in [(5, 4), (2, 4), (6, 8), (3, 4)]]},
                         model=trained["model"], data=trained["data"], steps=2, batch_size=2, seq_len=32,
                         eval_blocks=0, backend="reference", dtype="float32", progress=False)
    qradaptor.export(run_dir, tmp_path / "out")
    model = qradaptor.load(tmp_path / "out")
    backend = qradaptor.get_backend("reference")
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert measured_bytes(model) == predict(ModelShapes.from_config(model.config), plan, backend).total_bytes
    ids = torch.arange(2, 30)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, qradaptor.load(run_dir)(input_ids=ids).logits)


def test_evaluate_accepts_run_and_export_directories(trained, capsys):
    results = []
    for where in (trained["run"], trained["out"]):
        code, out, _ = run(capsys, "evaluate", "--model", where, "--data", trained["data"], "--seq-len", "32",
                           "--max-blocks", "2", "--json", "-q")
        assert code == 0
        results.append(json.loads(out))
    assert {"loss", "perplexity", "tokens"} <= set(results[0])
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-6)
    validation = json.loads((trained["run"] / "metrics.json").read_text())["validation"]
    assert results[1]["loss"] == pytest.approx(validation["loss"], abs=1e-5)  # same split and blocks as training's
    assert results[1]["plan"].startswith("2b×1 3b×1 4b×1 8b×1")
    plan = write_plan(trained["root"] / "again.json")
    code, _, err = run(capsys, "evaluate", "--model", trained["out"], "--plan", plan, "-q")
    assert_user_error(code, err, "--plan does not apply")


def test_generate_prints_a_continuation(trained, capsys):
    code, out, _ = run(capsys, "generate", trained["out"], "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "-q")
    assert code == 0 and len(out.split()) == 4 and all(w.startswith("w") or w == "<unk>" for w in out.split())


@pytest.mark.parametrize("case", ["untrained run", "not a run", "target is not an export"])
def test_export_bad_input(trained, tmp_path, capsys, monkeypatch, case):
    if case == "untrained run":
        interrupt_at_forward(monkeypatch, 3)
        assert main(train_argv(trained, tmp_path / "r")) == 130
        argv, needle = ["export", tmp_path / "r", "--to", tmp_path / "out"], "has not finished training"
    elif case == "not a run":
        (tmp_path / "r").mkdir()
        argv, needle = ["export", tmp_path / "r", "--to", tmp_path / "out"], "is not a training run"
    else:
        (tmp_path / "keep").mkdir()
        (tmp_path / "keep" / "notes.txt").write_text("mine")
        argv, needle = ["export", trained["run"], "--to", tmp_path / "keep"], "not an earlier export"
    before = snapshot(tmp_path), snapshot(trained["root"])
    code, _, err = run(capsys, *argv, "-q")
    assert_user_error(code, err, needle)
    assert (snapshot(tmp_path), snapshot(trained["root"])) == before


@pytest.mark.parametrize("earlier", [False, True])
def test_disk_full_export_leaves_nothing_that_looks_valid(trained, tmp_path, capsys, monkeypatch, earlier):
    target = tmp_path / "out"
    if earlier:
        assert main(["export", str(trained["run"]), "--to", str(target), "-q"]) == 0
    before = snapshot(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_command, "atomic_save_safetensors", disk_full)
    code, _, err = run(capsys, "export", trained["run"], "--to", target, "-q")
    assert_user_error(code, err, "No space left on device")
    assert snapshot(tmp_path) == before  # no half-written OUT, no temporary directory left behind
    assert sorted(os.listdir(tmp_path)) == (["out"] if earlier else [])


def test_generate_on_a_missing_artifact(tmp_path, capsys):
    code, _, err = run(capsys, "generate", tmp_path / "nope", "--prompt", "hi")
    assert_user_error(code, err, "artifact not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "generate", tmp_path / "empty", "--prompt", "hi")
    assert_user_error(code, err, "not a qradaptor artifact")


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_two_step_finetune_export_and_stock_reload(smollm2_dir, tmp_path):
    import qradaptor

    plan = {"layers": [{"bits": 8 if i in (0, 29) else (3 if i % 2 else 4), "rank": 8} for i in range(30)]}
    qradaptor.train_plan(tmp_path / "run", plan=plan, model=str(smollm2_dir), steps=2, batch_size=2, seq_len=64,
                         max_train_blocks=8, eval_blocks=2, dtype="float32", progress=False)  # exact reload check
    qradaptor.export(tmp_path / "run", tmp_path / "out")
    got, ranks = run_stock_program(tmp_path / "out", "def fibonacci(n):", tmp_path / "stock.safetensors")
    assert len(ranks) == 30 * 7
    model = qradaptor.load(tmp_path / "out")
    with torch.no_grad():
        ours = model(input_ids=got["ids"]).logits
    assert (ours - got["logits"]).abs().max().item() < 1e-3
    from qradaptor.memory import ModelShapes, measured_bytes, predict

    predicted = predict(ModelShapes.from_config(model.config), qradaptor.Plan.from_dict(plan), qradaptor.get_backend("hqq"))
    assert measured_bytes(model) == predicted.total_bytes


def test_a_bf16_run_trains_exports_and_loads_and_stock_code_matches_it_in_either_dtype(trained, tmp_path):
    """bf16 end to end: train, export, load. Loaded in the export's own dtype, stock transformers + peft compute
    exactly `qradaptor.load`'s logits. Loaded in float32 by both, they differ by the bf16 rounding of the
    dequantized weights (the stock model's weights are the bf16 product (q − z)·s; qradaptor's fp32 layers form it
    in fp32), less than when only one side computes in bf16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qradaptor

    args = [a for a in train_argv(trained, tmp_path / "r") if a not in ("--dtype", "float32")]
    assert main([*args, "--dtype", "bfloat16"]) == 0
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["dtype"] == "bfloat16" and run["status"] == "finished"
    assert main(["export", str(tmp_path / "r"), "--to", str(tmp_path / "o"), "-q"]) == 0
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))

    def stock(dtype):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=dtype)
        return PeftModel.from_pretrained(base, str(tmp_path / "o" / "adapter")).eval()(input_ids=ids).logits

    with torch.no_grad():
        ours = qradaptor.load(tmp_path / "o")(input_ids=ids).logits
        assert ours.dtype == torch.bfloat16 and torch.equal(ours, stock(torch.bfloat16))
        ours32 = qradaptor.load(tmp_path / "o", dtype="float32")(input_ids=ids).logits
        theirs32 = stock(torch.float32)
        both32 = float((ours32 - theirs32).abs().max())
        assert ours32.dtype == torch.float32 and both32 < 1e-2 * float(theirs32.abs().max())
        assert both32 < float((ours.float() - theirs32).abs().max())  # closer than bf16 against fp32
        # the run directory loads the same way, in its dtype and converted
        assert torch.equal(qradaptor.load(tmp_path / "r")(input_ids=ids).logits, ours)
        run32 = qradaptor.load(tmp_path / "r", dtype=torch.float32)(input_ids=ids).logits
        assert float((run32 - ours32).abs().max()) < 1e-5
    with pytest.raises(qradaptor.QRAdaptorError, match="cannot load in dtype"):
        qradaptor.load(tmp_path / "o", dtype="int8")


@pytest.mark.parametrize("what", ["adapter", "base"])
def test_an_export_with_pickled_weights_is_refused(trained, tmp_path, capsys, what):
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "export"
    shutil.copytree(trained["out"], out)
    if what == "adapter":
        path = out / "adapter" / "adapter_model.safetensors"
        torch.save(load_file(path), path.with_name("adapter_model.bin"))
        needle = "pickled adapter_model.bin"
    else:
        path = out / "model.safetensors"
        torch.save(load_file(path), path.with_name("pytorch_model.bin"))
        needle = "model.safetensors"
    path.unlink()
    before = snapshot(out)
    code, _, err = run(capsys, "generate", out, "--prompt", "w1 w2", "-q")
    assert_user_error(code, err, needle)
    assert snapshot(out) == before
