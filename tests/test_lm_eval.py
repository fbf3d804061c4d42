"""`evaluate --lm-eval`: lm-eval harness tasks from local YAML files, offline, on the in-memory model (plain,
quantized by a plan, a training run, an export). The metrics must equal what scoring each request with the
model directly gives; bad input gets one clear message and exit 2."""

from __future__ import annotations

import json
import math
import os
import sys
from importlib.util import find_spec

import pytest
import torch
from conftest import tiny_tokenizer

from qradaptor.cli import main
from qradaptor.errors import LMEvalError
from qradaptor.commands import evaluate_model
from qradaptor.evaluate import evaluate_lm_eval

needs_lm_eval = pytest.mark.skipif(find_spec("lm_eval") is None, reason="lm-eval is not installed (the lmeval extra)")

MC_YAML = """\
task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

ROLLING_YAML = """\
task: toy_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

HUB_YAML = """\
task: toy_hub
dataset_path: allenai/ai2_arc
dataset_name: ARC-Easy
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices.text}}"
doc_to_target: 0
"""


def mc_docs():
    """Questions and 2-4 choices of different lengths over the tiny tokenizer's words (w0..w125)."""
    docs = []
    for i in range(24):
        question = " ".join(f"w{(i * 5 + j) % 120}" for j in range(3 + i % 4))
        choices = [" ".join(f"w{(i * 11 + k * 7 + j) % 120}" for j in range(1 + (k + i) % 3)) for k in range(2 + i % 3)]
        docs.append({"question": question, "choices": choices, "answer": i % len(choices)})
    return docs


def rolling_docs():
    return [{"text": " ".join(f"w{(i * 13 + j * 3) % 120}" for j in range(8 + i * 5))} for i in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A directory of local task YAML files and the data they read."""
    root = tmp_path_factory.mktemp("lm-eval")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.yaml").write_text(MC_YAML.format(data=write_jsonl(root / "mc.jsonl", mc_docs())))
    (tasks / "toy_rolling.yaml").write_text(ROLLING_YAML.format(data=write_jsonl(root / "text.jsonl", rolling_docs())))
    (tasks / "toy_hub.yaml").write_text(HUB_YAML)
    (tasks / "toy_nodata.yaml").write_text(MC_YAML.format(data=root / "no-such.jsonl").replace("toy_mc", "toy_nodata"))
    return tasks


def words_file(path, n_lines=20):
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(30)) for i in range(n_lines)))
    return str(path)


# ---------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def token_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def reference_metrics(model, tokenizer):
    """The two toy tasks' metrics, computed by scoring every request with the model directly."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    acc, acc_norm = [], []
    for doc in mc_docs():
        context = encode(doc["question"])
        lls = []
        for choice in doc["choices"]:
            whole = encode(doc["question"] + " " + choice)  # lm-eval's target delimiter is one space
            lls.append(float(token_logprobs(model, whole)[len(context) - 1:].sum()))
        acc.append(max(range(len(lls)), key=lambda k: lls[k]) == doc["answer"])
        acc_norm.append(max(range(len(lls)), key=lambda k: lls[k] / len(doc["choices"][k])) == doc["answer"])
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ll = words = nbytes = 0
    for doc in rolling_docs():
        ll += float(token_logprobs(model, [prefix, *encode(doc["text"])]).sum())  # shorter than one window
        words += len(doc["text"].split())
        nbytes += len(doc["text"].encode())
    return {"toy_mc": {"acc": sum(acc) / len(acc), "acc_norm": sum(acc_norm) / len(acc_norm)},
            "toy_rolling": {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
                            "bits_per_byte": -ll / nbytes / math.log(2)}}


def assert_matches_reference(got, model, tokenizer):
    want = reference_metrics(model, tokenizer)
    assert set(got) == set(want)
    for task in want:
        assert got[task] == pytest.approx(want[task], rel=1e-4), task
    assert 0 <= got["toy_mc"]["acc"] <= 1 and 0 <= got["toy_mc"]["acc_norm"] <= 1


# ---------------------------------------------------------------------------------------------- library
@needs_lm_eval
def test_local_tasks_equal_direct_scoring_and_are_deterministic(tiny_model, tasks_dir):
    import datasets.config
    import huggingface_hub.constants

    def hub_settings():
        return ({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE")},
                huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
                datasets.config.HF_DATASETS_CACHE, os.path.exists(datasets.config.HF_DATASETS_CACHE))

    before = hub_settings()
    tokenizer = tiny_tokenizer()
    tiny_model.train()
    first = evaluate_lm_eval(tiny_model, tokenizer, ["toy_mc", "toy_rolling"], include_path=tasks_dir)
    assert tiny_model.training  # the caller's mode is restored
    assert_matches_reference(first, tiny_model.eval(), tokenizer)
    assert evaluate_lm_eval(tiny_model, tokenizer, ["toy_mc", "toy_rolling"], include_path=tasks_dir) == first
    # The offline settings and the temporary dataset cache do not outlive the call; the home cache is untouched.
    assert hub_settings() == before


@needs_lm_eval
def test_evaluate_model_with_plan_scores_the_quantized_model(tiny_dir, tasks_dir, tmp_path):
    from qradaptor.models import load_model
    from qradaptor.plan import Plan
    from qradaptor.quantize import quantize_model

    plan = Plan.uniform(4, bits=2, rank=8)
    report = evaluate_model(str(tiny_dir), data=words_file(tmp_path / "d.txt"), split="train", seq_len=32,
                            plan=plan, lm_eval_tasks=["toy_mc", "toy_rolling"], include_path=str(tasks_dir),
                            progress=False)
    assert report["loss"] > 0 and report["plan"]  # the loss report is still there
    model, tokenizer = load_model(str(tiny_dir))
    quantized = quantize_model(model, plan, "hqq", inplace=True).eval()
    assert_matches_reference(report["lm_eval"], quantized, tokenizer)
    plain = reference_metrics(load_model(str(tiny_dir))[0].eval(), tokenizer)
    assert report["lm_eval"]["toy_rolling"]["word_perplexity"] != pytest.approx(plain["toy_rolling"]["word_perplexity"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_config):
    """A finished training run of the tiny model (a few steps) and its export."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config).save_pretrained(root / "tiny")
    tiny_tokenizer().save_pretrained(root / "tiny")
    (root / "p.json").write_text(json.dumps({"layers": [{"bits": b, "rank": 8} for b in (4, 2, 8, 3)]}))
    assert main(["train", "--model", str(root / "tiny"), "--plan", str(root / "p.json"), "--data",
                 words_file(root / "d.txt", 40), "--out", str(root / "run"), "--steps", "3", "--batch-size", "2",
                 "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "1", "--eval-blocks", "0",
                 "--dtype", "float32", "-q"]) == 0  # fp32: lm-eval's batches must score exactly as ours
    assert main(["export", str(root / "run"), "--to", str(root / "out"), "-q"]) == 0
    return root


@needs_lm_eval
@pytest.mark.parametrize("artifact", ["out", "run"])
def test_trained_artifacts(exported, tasks_dir, artifact):
    from qradaptor.export import load_artifact, open_artifact
    from qradaptor.plan import Plan

    path = str(exported / artifact)
    report = evaluate_model(path, data=str(exported / "d.txt"), split="train", seq_len=32, max_blocks=2,
                            lm_eval_tasks=["toy_mc", "toy_rolling"], include_path=str(tasks_dir), progress=False)
    assert report["artifact"] == ("export" if artifact == "out" else "run")
    # the artifact's own plan, as open_artifact gives it (nothing is read off the model)
    plan = Plan.load(exported / "out" / "plan.json")
    assert report["plan"] == plan.describe() and open_artifact(path)[2] == plan
    model, tokenizer = load_artifact(path)
    assert_matches_reference(report["lm_eval"], model, tokenizer)


# ---------------------------------------------------------------------------------------------- CLI
def tiny(tiny_dir):
    from qradaptor.models import load_model

    model, tokenizer = load_model(str(tiny_dir))
    return model.eval(), tokenizer


def run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@needs_lm_eval
def test_cli_json_and_text(capsys, tiny_dir, tasks_dir, tmp_path):
    data = words_file(tmp_path / "d.txt")
    args = ["evaluate", "--model", tiny_dir, "--data", data, "--split", "train", "--seq-len", "32",
            "--lm-eval", "toy_mc,toy_rolling", "--include-path", tasks_dir, "-q"]
    code, out, _ = run(capsys, *args, "--json")
    assert code == 0
    report = json.loads(out)  # stdout holds only the JSON object
    assert report["loss"] > 0 and report["tokens"] > 0
    assert_matches_reference(report["lm_eval"], *tiny(tiny_dir))
    code, out, _ = run(capsys, *args)
    assert code == 0 and "train loss" in out
    acc = report["lm_eval"]["toy_mc"]["acc"]
    assert f"lm-eval toy_mc: acc {acc:.4f}, acc_norm" in out and "lm-eval toy_rolling: word_perplexity" in out


BAD_INPUTS = {
    "lm-eval not installed": (["--lm-eval", "toy_mc", "--include-path", "{tasks}"], "pip install 'qradaptor[lmeval]'"),
    "unknown task": (["--lm-eval", "toy_mc,nope", "--include-path", "{tasks}"], "unknown lm-eval task 'nope'"),
    "include path does not exist": (["--lm-eval", "toy_mc", "--include-path", "{tasks}/nope"], "does not exist"),
    "include path is a file": (["--lm-eval", "toy_mc", "--include-path", "{tasks}/toy_mc.yaml"], "not a directory"),
    "include path without tasks": (["--include-path", "{tasks}"], "no lm-eval task was named"),
    "local task needing the hub": (["--lm-eval", "toy_hub", "--include-path", "{tasks}"], "'toy_hub' needs a dataset"),
    "built-in task needing the hub": (["--lm-eval", "arc_easy"], "'arc_easy' needs a dataset from the Hugging Face Hub"),
    "local data file missing": (["--lm-eval", "toy_nodata", "--include-path", "{tasks}"], "'toy_nodata': its data"),
}
BEFORE_MODEL_LOADS = {"lm-eval not installed", "unknown task", "include path does not exist", "include path is a file",
                      "include path without tasks"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_message_exit_2(capsys, tiny_dir, tasks_dir, tmp_path, monkeypatch, case):
    if case == "lm-eval not installed":
        for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    elif find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (the lmeval extra)")
    argv, needle = BAD_INPUTS[case]
    # Input errors are found before the model loads: a missing model would be reported second.
    model = tmp_path / "no-such-model" if case in BEFORE_MODEL_LOADS else tiny_dir
    code, out, err = run(capsys, "evaluate", "--model", model, "--data", words_file(tmp_path / "d.txt"),
                         "--split", "train", "--seq-len", "32", "-q", *[a.format(tasks=tasks_dir) for a in argv])
    assert code == 2, err
    assert err.startswith("qradaptor: error:") and needle in err and "fix:" in err and "Traceback" not in err
    assert out == ""


def test_library_error_type(monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    for name in [m for m in sys.modules if m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(LMEvalError, match="not installed"):
        evaluate_lm_eval(tiny_model, tiny_tokenizer(), ["toy_mc"])
