"""The sensitivity profiler on tiny models: exact against the naive method, cached, resumable, validated."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from qradaptor.cli import main
from qradaptor.data import TokenBlocks
from qradaptor.errors import DataError
from qradaptor.plan import LayerChoice, Plan
from qradaptor.profile import (PARTIAL_FILE, ProfileError, ProfileSettings, Sensitivity, additivity, profile_model,
                               stability)
from qradaptor.commands import profile as profile_command
from qradaptor.quantize import quantize_model

VOCAB = 128
# The module, not the `qradaptor.profile` function the package exports under the same name.
profile_module = importlib.import_module("qradaptor.profile")


@pytest.fixture(scope="module")
def graded_model():
    """A tiny Llama whose layers differ clearly in sensitivity: each layer's attention and MLP outputs are
    scaled by its own power of two (in shuffled order), so some layers' quantization errors reach the
    output much more strongly than others'."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # sharper next-token distributions, like a trained model's
        for layer, power in zip(model.model.layers, [3, 0, 5, 1, 4, 2]):
            layer.mlp.down_proj.weight.mul_(2.0**power)
            layer.self_attn.o_proj.weight.mul_(2.0**power)
    return model


def blocks(n=8, seq=32, seed=0):
    ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return TokenBlocks(ids, ids.clone())


def settings(**kw):
    base = dict(bits=(2, 3, 4), tokens=8 * 32, seq_len=32, batch_size=4)
    return ProfileSettings(**{**base, **kw})


def naive_kl(model, ids, layer, bits):
    """The naive method: quantize one layer in a copy of the model and run the whole model."""
    plan_bits = [16] * model.config.num_hidden_layers
    plan_bits[layer] = bits
    quantized = quantize_model(model, Plan([LayerChoice(b, 1) for b in plan_bits]), "hqq")
    with torch.no_grad():
        p = F.log_softmax(model(input_ids=ids).logits, -1)
        q = F.log_softmax(quantized(input_ids=ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_cached_suffix_probes_equal_the_naive_full_forward(graded_model):
    data = blocks()
    result = profile_model(graded_model, None, settings(), blocks=data, use_cache=False, progress=False)
    for layer in (0, 3, 5):
        for bits in (2, 4):
            expected = naive_kl(graded_model, data.input_ids, layer, bits)
            assert result.kl[layer][bits] == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_compact_reference_gives_the_exact_kl_with_a_head_bias():
    """KL from (negative entropy, expected output embedding, expected bias) equals the KL computed from
    the full distributions, and the reference holds 1 + hidden numbers per token, not a vocabulary."""
    torch.manual_seed(0)
    hidden, vocab = 16, 300
    class CausalLM(torch.nn.Module):  # what Head reads of a transformers model: its stack's norm, its head
        base_model = property(lambda self: self.model)

        def get_output_embeddings(self):
            return self.lm_head

    model = CausalLM()
    model.model = torch.nn.Module()
    model.model.norm = torch.nn.Identity()
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
    head = profile_module.Head(model)
    h_ref, h_q = torch.randn(2, 5, hidden) * 3, None
    h_q = h_ref + 0.3 * torch.randn_like(h_ref)
    reference = profile_module.Reference(*[[t] for t in head.reference(h_ref)])
    w, b = model.lm_head.weight.double(), model.lm_head.bias.double()
    p = F.log_softmax(h_ref.double() @ w.T + b, -1)
    q = F.log_softmax(h_q.double() @ w.T + b, -1)
    exact = float((p.exp() * (p - q)).sum())  # in float64
    # fp32 inputs: per-position error of the order of fp32 rounding of the logsumexp (~1e-7 nats)
    assert abs(float(head.kl_sum(h_q, reference, 0)) - exact) / 10 < 1e-6
    assert reference.mean_embedding[0].shape == (2, 5, hidden) and reference.neg_entropy[0].shape == (2, 5)


def test_outputs_and_monotone_sensitivity(graded_model, tmp_path):
    result = profile_model(graded_model, None, settings(), blocks=blocks(), out=tmp_path, use_cache=False,
                           progress=False)
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    for key in ("model_fingerprint", "bits", "layers", "kl", "weight_error", "settings", "reference_storage"):
        assert key in saved
    assert saved["layers"] == 6 and saved["bits"] == [2, 3, 4] and len(saved["kl"]) == 6
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert not (tmp_path / PARTIAL_FILE).exists()
    assert Sensitivity.load(tmp_path / "sensitivity.json").kl == result.kl
    for layer in range(6):
        kl, err = result.kl[layer], result.weight_error[layer]
        assert kl[2] > kl[3] > kl[4] > 0
        assert err[2] > err[3] > err[4] > err[8] > 0
    # 8 bits everywhere costs far less than 4 bits anywhere adds up to: a sign of wasted bytes
    assert result.kl_uniform[8] < sum(result.kl[l][4] for l in range(6)) / 20


def test_second_identical_call_uses_the_disk_cache(graded_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QRADAPTOR_CACHE", str(tmp_path / "cache"))
    first = profile_model(graded_model, None, settings(), blocks=blocks(), progress=False)
    calls = []
    monkeypatch.setattr(profile_module, "mean_kl", lambda *a: calls.append(a) or 0.0)
    again = profile_model(graded_model, None, settings(), blocks=blocks(), out=tmp_path / "out", progress=False)
    assert again.from_cache and not first.from_cache and calls == []
    assert again.kl == first.kl and (tmp_path / "out" / "sensitivity.json").is_file()
    other = profile_model(graded_model, None, settings(group_size=32), blocks=blocks(), progress=False)
    assert not other.from_cache and calls  # different settings: computed, not served from the cache


def test_interrupted_profile_keeps_its_probes_and_resumes(graded_model, tmp_path):
    s, data = settings(), blocks()
    full = profile_model(graded_model, None, s, blocks=data, use_cache=False, progress=False)

    def stop_after_five(layer, bits, kl, seen=[]):
        seen.append((layer, bits))
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_model(graded_model, None, s, blocks=data, out=tmp_path, use_cache=False, progress=False,
                      on_probe=stop_after_five)
    partial = json.loads((tmp_path / PARTIAL_FILE).read_text())
    assert len(partial["probes"]) == 5
    done = []
    resumed = profile_model(graded_model, None, s, blocks=data, out=tmp_path, use_cache=False, progress=False,
                            on_probe=lambda l, b, kl: done.append((l, b)))
    assert len(done) == 6 * 3 - 5
    assert all(resumed.kl[l][b] == pytest.approx(full.kl[l][b], rel=1e-6) for l in range(6) for b in (2, 3, 4))


def test_stability_and_additivity_on_a_tiny_model(graded_model):
    s, data = settings(), blocks(n=16)
    stable = stability(graded_model, s, data)
    assert stable["spearman"] >= 0.9
    prior = profile_model(graded_model, None, s, blocks=data, use_cache=False, progress=False)
    adds = additivity(graded_model, prior, s, data, plans=12)
    assert adds["spearman"] >= 0.8
    assert len(adds["measured"]) == 12 and all(m > 0 for m in adds["measured"])


def test_per_module_estimates_rank_linears_as_their_own_probes_do(graded_model, tmp_path):
    """Each linear's estimated KL (its share of its layer's, by the layer's output error) against the KL with that
    linear alone quantized, measured as the layer's probe is: the graded model's scaled o_proj/down_proj and its
    layers' scales must come out in the same order."""
    s, data = settings(modules=True, module_tokens=2 * 32), blocks()
    result = profile_model(graded_model, None, s, blocks=data, out=tmp_path, use_cache=False, progress=False)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(result.module_kl) == 6 and all(tuple(layer) == names for layer in result.module_kl)
    assert all(row[2] > row[4] > 0 for layer in result.module_kl for row in layer.values())
    assert Sensitivity.load(tmp_path / "sensitivity.json").module_kl == result.module_kl
    agreement = profile_module.module_agreement(graded_model, result, s, data)
    # measured 0.99 over all pairs, 0.90 within layers (on SmolLM2: benchmarks/results/module_profile.md)
    assert agreement["spearman"] >= 0.85 and agreement["spearman_within_layers"] >= 0.7, agreement
    # the profile of the layers is the same with or without the modules' estimates, and so is its cache key
    plain = profile_model(graded_model, None, settings(), blocks=data, use_cache=False, progress=False)
    assert plain.kl == result.kl and plain.module_kl == []
    assert settings().to_dict() == settings(module_tokens=7).to_dict() != s.to_dict()


def test_cli_profile_modules_names_the_most_sensitive_linears(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 3 + j) % 100}" for j in range(40)) for i in range(60)))
    assert main(["profile", "--model", str(tiny_dir), "--data", str(data), "--tokens", "64",
                 "--seq-len", "32", "--bits", "2", "--modules", "--out", str(tmp_path / "p"), "-q"]) == 0
    said = capsys.readouterr().out
    assert "most sensitive linears at 2 bits (estimated): layer" in said, said
    saved = json.loads((tmp_path / "p" / "sensitivity.json").read_text())
    assert len(saved["module_kl"]) == 4 and saved["settings"]["modules"] is True


# --- bad input -----------------------------------------------------------------------------------------


def test_bits_the_profile_or_the_backend_lacks(graded_model):
    with pytest.raises(ProfileError, match=r"cannot profile bits \[1\]"):
        settings(bits=(1, 4))
    with pytest.raises(ProfileError, match="hqq-native backend cannot store 5-bit") as e:
        profile_model(graded_model, None, settings(bits=(4, 5), backend="hqq-native"), blocks=blocks(),
                      use_cache=False, progress=False)
    assert "--backend hqq" in e.value.fix


def test_too_short_calibration_says_how_many_tokens(tiny_dir, tmp_path):
    (tmp_path / "d.txt").write_text("\n\n".join(" ".join(f"w{j}" for j in range(20)) for _ in range(25)))
    with pytest.raises(DataError) as e:
        profile_command(str(tiny_dir), data=str(tmp_path / "d.txt"), out=tmp_path / "out", tokens=4096,
                               seq_len=32, use_cache=False, progress=False)
    assert "needs 4096" in str(e.value) and "--tokens" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_output_directory_of_another_model_is_refused_unless_forced(graded_model, tiny_model, tmp_path):
    profile_model(graded_model, None, settings(), blocks=blocks(), out=tmp_path, use_cache=False, progress=False)
    before = (tmp_path / "sensitivity.json").read_text()
    with pytest.raises(ProfileError, match="different model"):
        profile_model(tiny_model, None, settings(), blocks=blocks(), out=tmp_path, use_cache=False, progress=False)
    assert (tmp_path / "sensitivity.json").read_text() == before
    forced = profile_model(tiny_model, None, settings(bits=(4,)), blocks=blocks(), out=tmp_path, force=True,
                           use_cache=False, progress=False)
    assert json.loads((tmp_path / "sensitivity.json").read_text())["model_fingerprint"] == forced.model_fingerprint


def test_cli_ctrl_c_exits_130_and_keeps_finished_probes(tiny_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(" ".join(f"w{(i * 3 + j) % 100}" for j in range(40)) for i in range(60)))
    real = profile_module.mean_kl
    calls = []

    def interrupt_on_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(profile_module, "mean_kl", interrupt_on_fourth)
    argv = ["profile", "--model", str(tiny_dir), "--data", str(data), "--tokens", "256", "--out", str(tmp_path / "o"),
            "--no-cache", "-q"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "o" / PARTIAL_FILE).read_text())["probes"]) == 3
    monkeypatch.setattr(profile_module, "mean_kl", real)
    assert main(argv) == 0
    assert json.loads((tmp_path / "o" / "sensitivity.json").read_text())["layers"] == 4
