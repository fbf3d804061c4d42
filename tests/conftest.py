"""Shared fixtures. Nothing here writes to the user's home: HF_HOME always points to a temp dir, and the
model cache (QRADAPTOR_CACHE) does too unless the caller set one (so the SmolLM2 conversion can be reused
across local test runs)."""

from __future__ import annotations

import os
import tempfile

_SESSION_TMP = tempfile.mkdtemp(prefix="qradaptor-tests-")
os.environ["HF_HOME"] = os.path.join(_SESSION_TMP, "hf")
os.environ.setdefault("QRADAPTOR_CACHE", os.path.join(_SESSION_TMP, "cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# processes started by the tests share the cores among themselves (qradaptor.threads), not with the user's runs
os.environ["QRADAPTOR_RUNTIME_DIR"] = os.path.join(_SESSION_TMP, "processes")
# The default dtype ("auto") depends on the CPU (qradaptor.precision): tests compute alike on every machine, in
# float32 unless they ask for bfloat16; test_precision.py tests the choice itself with this unset.
os.environ.setdefault("QRADAPTOR_DTYPE", "float32")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


@pytest.fixture
def tiny_model(tiny_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config).eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model, converted once per test session (or reused from QRADAPTOR_CACHE)."""
    from qradaptor.models import default_model_path

    return default_model_path()


def tiny_tokenizer():
    """A 128-word word-level tokenizer matching the tiny model's vocab, built offline in milliseconds."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def tiny_dir(tmp_path, tiny_model):
    """The tiny random Llama saved with a tokenizer, as a user's fine-tuned model directory would be."""
    out = tmp_path / "tiny"
    tiny_model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def words(tmp_path_factory):
    """A text file of 120 paragraphs of 40 words the tiny tokenizer knows (w0..w119): the search tests' data."""
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text("\n\n".join(" ".join(f"w{(i * 7 + j * 3) % 120}" for j in range(40)) for i in range(120)))
    return str(path)


def tiny_profiled(tmp_path_factory, *, modules: bool = False):
    """A tiny random Llama saved with a tokenizer (no tied embeddings), the loaded model and its real
    sensitivity profile on 4 random blocks of 32 tokens (with ``modules``, per-linear estimates too): what the
    search tests start from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qradaptor.data import TokenBlocks
    from qradaptor.models import load_model
    from qradaptor.profile import ProfileSettings, profile_model

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model") / "tiny"
    LlamaForCausalLM(config).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    model, tok = load_model(str(d))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    prior = profile_model(model, tok, ProfileSettings(tokens=128, seq_len=32, modules=modules, module_tokens=64),
                          blocks=TokenBlocks(ids, ids.clone()), use_cache=False, progress=False)
    return d, model, prior
