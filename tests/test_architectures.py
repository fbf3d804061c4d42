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


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_run_export_stock_reload_and_generate(arch, tmp_path, capsys):
    import transformers
    from conftest import tiny_tokenizer
    from peft import AutoPeftModelForCausalLM

    import qradaptor
    from qradaptor.memory import ModelShapes, measured_bytes, predict
    from qradaptor.plan import Plan

    config_class, model_class, extra, linears = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    getattr(transformers, model_class)(config).save_pretrained(tmp_path / "model")
    (byte_level_tokenizer() if arch.startswith("qwen2") else tiny_tokenizer()).save_pretrained(tmp_path / "model")
    words = tmp_path / "words.txt"
    words.write_text(words_text())
    out = tmp_path / "run"
    assert main(["run", "--model", str(tmp_path / "model"), "--data", str(words), "--budget", "4bit", "--steps", "4",
                 "--trials", "2", "--population", "2", "--promote", "0", "--refine", "0", "--seq-len", "32",
                 "--profile-tokens", "256", "--eval-blocks", "2", "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    export = out / "model"

    ours = qradaptor.load(export)
    stock = AutoPeftModelForCausalLM.from_pretrained(export / "adapter", dtype="auto").eval()
    adapted = {n.rsplit(".", 1)[-1] for n, m in stock.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linears  # every linear of the decoder layers, fused ones included
    ids = torch.arange(2, 30)[None]
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, ours(input_ids=ids).logits)
    plan = Plan.load(export / "plan.json")
    predicted = predict(ModelShapes.from_config(ours.config), plan, qradaptor.get_backend("hqq"))
    assert measured_bytes(ours) == predicted.total_bytes
    capsys.readouterr()
    assert main(["generate", str(export), "--prompt", "w1 w2 w3", "--max-new-tokens", "3", "-q"]) == 0
    assert capsys.readouterr().out.strip()
