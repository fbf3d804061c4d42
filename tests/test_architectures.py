"""Every architecture in the README's table, end to end on a tiny random model: `run --budget 4bit` → export →
PEFT's stock auto class in the export's dtype (logits equal to `qradaptor.load`'s) → `generate`; the adapters sit
on every linear of the decoder layers (fused projections included) and the memory model is exact."""

from __future__ import annotations

import pytest
import torch

from qradaptor.cli import main

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=1, pad_token_id=0)
#: name → (config class, model class, settings beyond COMMON, the linears of a decoder layer)
LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, LLAMA_LINEARS),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, LLAMA_LINEARS),
    # Qwen2's tokenizer class is byte-level BPE whatever the files say: a word-level vocabulary gives it no tokens
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"vocab_size": 320}, LLAMA_LINEARS),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, LLAMA_LINEARS),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}, LLAMA_LINEARS),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}, LLAMA_LINEARS),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, LLAMA_LINEARS),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, LLAMA_LINEARS),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}, LLAMA_LINEARS),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    # decoder stack `gpt_neox`, final norm `final_layer_norm`, fused query_key_value, biases everywhere
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"vocab_size": 320, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}, LLAMA_LINEARS),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2},
                {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {},
                 {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
}


def words_text() -> str:
    return "\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120))


def byte_level_tokenizer():
    """A byte-level BPE of 300 pieces learnt from the words (what a Qwen2 tokenizer is), in milliseconds."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([words_text()], vocab_size=300, min_frequency=1, special_tokens=["<unk>", "<eos>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "mixtral+expert-adapters"])
def test_run_export_stock_reload_and_generate(arch, tmp_path, capsys):
    import transformers
    from conftest import tiny_tokenizer
    from peft import AutoPeftModelForCausalLM

    import qradaptor
    from qradaptor.memory import ModelShapes, measured_bytes, predict
    from qradaptor.plan import Plan

    arch, _, flag = arch.partition("+")
    config_class, model_class, extra, linears = ARCHITECTURES[arch]
    if flag:  # the routed experts adapted too: PEFT's adapters on their 3-D tensors in the export
        linears = linears | {"experts"}
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    getattr(transformers, model_class)(config).save_pretrained(tmp_path / "model")
    (byte_level_tokenizer() if arch.startswith("qwen2") else tiny_tokenizer()).save_pretrained(tmp_path / "model")
    words = tmp_path / "words.txt"
    words.write_text(words_text())
    out = tmp_path / "run"
    assert main(["run", "--model", str(tmp_path / "model"), "--data", str(words), "--budget", "4bit", "--steps", "4",
                 "--trials", "2", "--population", "2", "--promote", "0", "--refine", "0", "--seq-len", "32",
                 "--profile-tokens", "256", "--eval-blocks", "2", "--out", str(out), "-q"]
                + ([f"--{flag}"] if flag else [])) == 0, capsys.readouterr().err
    export = out / "model"

    ours = qradaptor.load(export)
    moe = {"experts_implementation": "eager"} if "moe" in arch or arch == "mixtral" else {}
    # transformers' own per-expert loop, which computes the routed experts as qradaptor's does
    stock = AutoPeftModelForCausalLM.from_pretrained(export / "adapter", dtype="auto", **moe).eval()
    adapted = {n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in stock.named_modules()
               if hasattr(m, "lora_A")}
    assert adapted == linears  # every linear of the decoder layers, fused ones included
    ids = torch.arange(2, 30)[None]
    with torch.no_grad():  # PEFT adds an expert's B·A to its weight, qradaptor computes it beside: not bit-equal
        torch.testing.assert_close(stock(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0,
                                   atol=1e-5 if flag else 0)
    if moe:  # the routed experts are quantized (their linears replaced by the backend's modules) ...
        experts = [m for n, m in ours.named_modules() if n.endswith("experts.down_proj")]
        assert experts and all(qradaptor.backends.is_quantized(getattr(m, "base_layer", m))
                                 for m in experts[0].children())
        # ... and transformers' default (grouped) experts kernel agrees up to its summation order
        default = AutoPeftModelForCausalLM.from_pretrained(export / "adapter", dtype="auto").eval()
        with torch.no_grad():
            torch.testing.assert_close(default(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)
    plan = Plan.load(export / "plan.json")
    assert plan.expert_adapters == bool(flag)
    predicted = predict(ModelShapes.from_config(ours.config), plan, qradaptor.get_backend("hqq"))
    assert measured_bytes(ours) == predicted.total_bytes
    capsys.readouterr()
    assert main(["generate", str(export), "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "-q"]) == 0
    assert capsys.readouterr().out.strip()


def tiny_moe(arch: str = "qwen2_moe"):
    import transformers

    config_class, model_class, extra, _ = ARCHITECTURES[arch]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**{**COMMON, **extra}))


def test_split_experts_compute_what_transformers_computes_and_train_through_quantized_experts():
    import copy

    from qradaptor.architecture import ExpertLinears, split_experts
    from qradaptor.backends import get_backend
    from qradaptor.memory import ModelShapes
    from qradaptor.plan import Plan
    from qradaptor.quantize import prepare_model

    model = tiny_moe().eval()
    model.config._experts_implementation = "eager"
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fused_shapes = ModelShapes.from_model(model)
    split = copy.deepcopy(model)
    assert split_experts(split) == 4 and split_experts(split) == 0  # two projections × two layers; once
    holder = split.model.layers[0].mlp.experts.down_proj
    assert isinstance(holder, ExpertLinears) and len(holder) == 4
    first, second = (holder._modules[e].weight for e in ("0", "1"))
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # views: nothing copied
    with torch.no_grad():
        assert torch.equal(split(input_ids=ids).logits, expected)
    # priced the same whether split or not; the routed experts are half of this tiny model's decoder weights
    def by_name(shapes):
        return [sorted(layer, key=lambda s: s.name) for layer in shapes.layers], shapes.other_numel

    assert by_name(ModelShapes.from_model(split)) == by_name(fused_shapes) and fused_shapes.expert_numel > 0
    assert fused_shapes.unquantized_numel == 2 * 4 * 64  # the routers only

    tuned = prepare_model(split, Plan.uniform(2, 3, 4), get_backend("hqq"))
    tuned.train()
    loss = tuned(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in tuned.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not any("experts" in n for n, p in tuned.named_parameters() if p.requires_grad)  # no expert adapters


def test_experts_that_cannot_be_split_are_said_once_and_counted(tmp_path, caplog, capsys):
    """GPT-OSS keeps its experts transposed with biases: not split, so not quantized, and every command says so."""
    import logging

    import transformers
    from conftest import tiny_tokenizer

    from qradaptor.models import load_model
    from qradaptor.plan import Plan

    config = transformers.GptOssConfig(**{**COMMON, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2})
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="qradaptor"):
        load_model(tmp_path / "m")
    said = [r.getMessage() for r in caplog.records if "not in linear modules" in r.getMessage()]
    assert len(said) == 1 and "GptOssExperts" in said[0], caplog.text
    Plan.uniform(2, 4, 8).save(tmp_path / "plan.json")
    capsys.readouterr()
    assert main(["memory", "--model", str(tmp_path / "m"), "--plan", str(tmp_path / "plan.json"), "--measure"]) == 0
    out = capsys.readouterr().out
    assert "not quantized:" in out and "+0.000%" in out, out  # said, and priced at its real size


def test_expert_adapters_train_price_export_and_reload_in_stock_peft(tmp_path, capsys):
    """--expert-adapters: one adapter per routed expert at its layer's rank, priced exactly, trained, exported as
    PEFT's adapters on the 3-D expert tensors (stock reload = qradaptor.load), merged alike; refused where wrong."""
    import transformers
    from peft import AutoPeftModelForCausalLM

    import qradaptor
    from qradaptor.memory import ModelShapes, measured_bytes, predict
    from qradaptor.plan import Plan

    tiny_moe().save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    words = tmp_path / "words.txt"
    words.write_text(words_text())
    plan = Plan.from_dict({"layers": [{"bits": 4, "rank": 8}, {"bits": 3, "rank": 4}]})
    plan.save(tmp_path / "plan.json")
    out, export = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"), "--data",
                 str(words), "--expert-adapters", "--steps", "3", "--seq-len", "32", "--lr", "1e-2", "--out", str(out),
                 "-q"]) == 0, capsys.readouterr().err
    trained = qradaptor.open_run(out)
    assert trained.plan.expert_adapters and "expert adapters" in trained.plan.describe()
    base = trained.model.get_base_model()
    experts = base.model.layers[1].mlp.experts.down_proj
    assert [experts._modules[str(e)].r["default"] for e in range(4)] == [4] * 4  # the layer's rank
    assert all(experts._modules[str(e)].lora_A["default"].weight.shape == (4, 32) for e in range(4))
    # trained: some expert's B moved off its zero start
    assert any(experts._modules[str(e)].lora_B["default"].weight.abs().max() > 0 for e in range(4))
    shapes = ModelShapes.from_config(trained.model.config)
    report = predict(shapes, trained.plan, qradaptor.get_backend("hqq"))
    trainable = sum(p.numel() for n, p in trained.model.named_parameters() if "lora_" in n)
    without = predict(shapes, Plan.from_dict({**trained.plan.to_dict(), "expert_adapters": False}),
                      qradaptor.get_backend("hqq"))
    assert report.trainable_params == trainable > without.trainable_params
    assert measured_bytes(trained.model) == report.total_bytes
    Plan.from_dict({**plan.to_dict(), "expert_adapters": True}).save(tmp_path / "experts.json")
    capsys.readouterr()
    assert main(["memory", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "experts.json"),
                 "--measure"]) == 0
    said = capsys.readouterr().out
    assert "an adapter on every expert" in said and "+0.000%" in said, said

    assert main(["export", str(out), "--to", str(export), "--merge", "-q"]) == 0, capsys.readouterr().err
    ours = qradaptor.load(export)
    stock = AutoPeftModelForCausalLM.from_pretrained(export / "adapter", dtype="auto",
                                                     experts_implementation="eager").eval()
    assert any(type(m).__name__ == "ParamWrapper" for m in stock.modules())
    plain = transformers.AutoModelForCausalLM.from_pretrained(export, experts_implementation="eager").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(export / "merged", experts_implementation="eager").eval()
    ids = torch.arange(2, 30)[None]
    with torch.no_grad():
        got, want = stock(input_ids=ids).logits, ours(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        # the expert adapters matter: without them (the run's adapters elsewhere kept) the logits move
        for holder in ours.get_base_model().modules():
            if type(holder).__name__ == "ExpertLinears":
                for linear in holder.children():
                    linear.lora_B["default"].weight.zero_()
        assert (ours(input_ids=ids).logits - want).abs().max() > 1e-4
        assert (plain(input_ids=ids).logits - want).abs().max() > 1e-4

    capsys.readouterr()  # on a model without routed experts: refused before any work
    llama = tmp_path / "llama"
    config = transformers.LlamaConfig(**COMMON)
    transformers.LlamaForCausalLM(config).save_pretrained(llama)
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(llama)
    assert main(["train", "--model", str(llama), "--plan", str(tmp_path / "plan.json"), "--data", str(words),
                 "--expert-adapters", "--steps", "1", "--out", str(tmp_path / "dense"), "-q"]) != 0
    assert "no routed experts" in capsys.readouterr().err
    assert main(["run", "--model", str(llama), "--data", str(words), "--budget", "4bit", "--expert-adapters",
                 "--out", str(tmp_path / "dense-run"), "-q"]) != 0
    assert "--expert-adapters" in capsys.readouterr().err and not (tmp_path / "dense-run" / "sensitivity.json").exists()
    from qradaptor.errors import PlanError

    with pytest.raises(PlanError, match="DoRA adapters on routed experts"):
        Plan.uniform(2, 4, 8, dora=True, expert_adapters=True)


def test_expert_adapters_where_some_layers_are_dense():
    """Qwen2-MoE's mlp_only_layers keeps layer 0 a dense MLP: the experts of the other layers get their adapters,
    priced exactly."""
    import transformers

    from qradaptor.architecture import split_experts
    from qradaptor.backends import get_backend
    from qradaptor.memory import ModelShapes, predict
    from qradaptor.plan import Plan
    from qradaptor.quantize import prepare_model

    extra = ARCHITECTURES["qwen2_moe"][2]
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**{**COMMON, **extra, "mlp_only_layers": [0]}))
    shapes = ModelShapes.from_model(model)
    split_experts(model)
    plan = Plan.from_dict({"layers": [{"bits": 4, "rank": 8}, {"bits": 4, "rank": 4}], "expert_adapters": True})
    tuned = prepare_model(model, plan, get_backend("hqq"))
    adapted = [n for n, _ in tuned.named_modules() if n.endswith(".lora_A") and ".experts." in n]
    assert len(adapted) == 2 * 4 and all(".layers.1." in n for n in adapted)  # two projections × four experts
    trainable = sum(p.numel() for n, p in tuned.named_parameters() if "lora_" in n)
    assert trainable == predict(shapes, plan, get_backend("hqq")).trainable_params
