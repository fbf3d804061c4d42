"""The metadata of an exported GGUF file (architecture, hyperparameters, tokenizer, chat template), from wherever
the run's base came from: copied from the base's own GGUF file (`GGUFFileMetadata`), or, for a base loaded from a
transformers directory or hub id, written from its config and tokenizer as llama.cpp's converter
(``convert_hf_to_gguf.py``) writes them (`TransformersMetadata`). Both have ``arch`` (the GGUF architecture),
``write(writer)`` and ``tensors()`` (what llama.cpp needs beside the model's own tensors); `metadata_for` picks one
or refuses, before anything is written.

The tokenizer: GPT-2-style byte-level BPE (Llama 3, SmolLM, Qwen2/Qwen3) is written as llama.cpp's ``gpt2`` model
(tokens, token types, merges, special ids, chat template). llama.cpp splits text with a pre-tokenizer it picks by
name (``tokenizer.ggml.pre``); its converter finds that name by tokenizing one fixed text and looking the hash of
the ids up in a table, and so does this module, for the tokenizers of the families it writes. Any other tokenizer
is refused with the way out (convert the base with llama.cpp, train from that ``.gguf``), never written wrongly.
"""

from __future__ import annotations

import functools
import json
import tempfile
from hashlib import sha256
from pathlib import Path

from .errors import ArtifactError

#: transformers ``model_type`` → the GGUF architecture written (llama.cpp graphs the export is checked in).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

#: The text llama.cpp's converter tokenizes to recognise a pre-tokenizer (``get_vocab_base_pre``), and the hashes
#: (sha256 of ``str(ids)``) of the tokenizers of the families written here, from its table.
_CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
               "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
               "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
               "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5, Qwen3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
#: A tokenizer whose vocabulary differs from its family's (added tokens; or a Qwen2/Qwen3 directory, which
#: transformers 5 always tokenizes with Qwen's rules) hashes to no entry: it is recognised by its text rules
#: (normalizer and pre-tokenizer, as tokenizer.json spells them), checked equal to the real Qwen3 tokenizer's.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_RULES = {"qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})}
#: transformers rope types written: plain rope, linear scaling (a GGUF key), Llama 3's (a tensor of divisors)
ROPE_TYPES = ("default", "linear", "llama3")
# llama.cpp's token types (gguf.TokenType): what each vocabulary entry is
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int):
    """The reader of a GGUF file, kept while the file is unchanged (size and mtime): parsing the keys takes ~11 s
    on 2 cores (a vocabulary of 49k tokens is ~300k small arrays), and an export reads them twice (its check, then
    its writing). The tensors stay memory-mapped, read-only."""
    import gguf

    return gguf.GGUFReader(path)


class GGUFFileMetadata:
    """Every key of the GGUF file the base was loaded from, but the file-type keys (each export writes its own)."""

    SKIP = ("general.file_type", "general.quantization_version", "general.alignment", "general.architecture")

    def __init__(self, path: Path):
        try:
            stat = Path(path).stat()
            self.reader = _read_gguf(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read the base's GGUF file {path}: {e}",
                                "restore the file, or export without --gguf")
        self.arch = str(self.reader.fields["general.architecture"].contents())
        if self.arch not in ARCHITECTURES.values():
            raise ArtifactError(f"the GGUF export writes {', '.join(sorted(set(ARCHITECTURES.values())))} models; "
                                f"this base is {self.arch!r}",
                                "export without --gguf (the transformers + PEFT export loads anywhere)")

    def write(self, writer) -> None:
        import gguf

        for f in self.reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in self.SKIP:
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)

    def tensors(self) -> dict:
        """None beside the model's own: the base was loaded by transformers from this file, and what it kept of
        it is what the export writes."""
        return {}


class TransformersMetadata:
    """Hyperparameters and tokenizer of a transformers base (``config``, ``tokenizer``), as llama.cpp's converter
    writes them for its Llama and Qwen2/Qwen3 models (and Llama 3's rope divisors, `tensors`). Refuses what it
    cannot write exactly: another architecture, YaRN and other rope scalings, a sliding window, a tokenizer
    llama.cpp's converter does not recognise."""

    def __init__(self, config, tokenizer, name: str):
        self.config, self.tokenizer, self.name = config, tokenizer, name
        self.arch = ARCHITECTURES.get(config.model_type)
        if self.arch is None:
            raise ArtifactError(f"the GGUF export writes {', '.join(ARCHITECTURES)} models (transformers model_type); "
                                f"this base is {config.model_type!r}",
                                "export without --gguf (the transformers + PEFT export loads anywhere)")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        self.rope_type = rope.get("rope_type", "default")
        if self.rope_type not in ROPE_TYPES or (self.rope_type == "llama3" and self.arch != "llama"):
            raise ArtifactError(f"the GGUF export writes rope scaling of the kinds {', '.join(ROPE_TYPES)} (llama3 on "
                                f"Llama); this {self.arch} base uses {self.rope_type!r} rope scaling",
                                "convert the base with llama.cpp's convert_hf_to_gguf.py, train from that .gguf file "
                                "(its metadata is copied as it is), or export without --gguf")
        self.rope_factor = rope.get("factor")
        if getattr(config, "use_sliding_window", False):
            raise ArtifactError("this base uses sliding-window attention, which llama.cpp's "
                                f"{self.arch} graph does not", "export without --gguf")
        self.rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        self.pre = self._pre_tokenizer()

    def _pre_tokenizer(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        kind = type(backend.model).__name__ if backend is not None else type(self.tokenizer).__name__
        digest = sha256(str(self.tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest() if kind == "BPE" else None
        if digest in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[digest]
        rules = json.loads(backend.to_str()) if kind == "BPE" else {}
        for name, (normalizer, pre_tokenizer) in PRE_TOKENIZER_RULES.items():
            if rules.get("normalizer") == normalizer and rules.get("pre_tokenizer") == pre_tokenizer:
                return name
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise ArtifactError(f"the GGUF export writes byte-level BPE tokenizers whose pre-tokenizer llama.cpp knows "
                            f"({known}); this base's tokenizer is "
                            + (f"a {kind} one" if digest is None else f"not one of them (hash {digest[:12]}…)"),
                            "convert the base with llama.cpp's convert_hf_to_gguf.py and train from that .gguf file "
                            "(its metadata is copied as it is), or export without --gguf")

    def write(self, writer) -> None:
        c, arch = self.config, self.arch
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        writer.add_type("model")
        writer.add_name(self.name)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
        writer.add_rope_freq_base(float(self.rope_theta))
        writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
        if head_dim != c.hidden_size // heads:  # llama.cpp's default is hidden_size / heads (Qwen3 differs)
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if arch == "llama":
            writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if self.rope_type == "linear":
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope_factor))
        self._write_tokenizer(writer)

    def tensors(self) -> dict:
        """Tensors llama.cpp needs beside the model's own (GGUF name → float32 array): Llama 3's rope scaling is a
        per-frequency divisor, ``rope_freqs.weight``, computed here as transformers computes its frequencies."""
        if self.rope_type != "llama3":
            return {}
        import torch
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        c = self.config
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        plain = 1.0 / (float(self.rope_theta) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
        return {"rope_freqs.weight": (plain / scaled.double()).float().numpy()}

    def _write_tokenizer(self, writer) -> None:
        tokens, types, special = self._tokenizer_parts
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_add_space_prefix(False)  # byte-level BPE encodes spaces itself
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    @functools.cached_property
    def _tokenizer_parts(self) -> tuple[list[str], list[int], object]:
        """The vocabulary and gguf's ``SpecialVocab``, read once: an export writes the header up to three times
        (model.gguf, merged.gguf, and `predict_gguf`'s sizes)."""
        import gguf

        tokens, types = self.vocabulary()
        # merges, special ids and the chat template: gguf's own reader of tokenizer files, on the tokenizer as saved
        with tempfile.TemporaryDirectory(prefix="qradaptor-tokenizer-") as tmp:
            self.tokenizer.save_pretrained(tmp)
            special = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise ArtifactError("the base's tokenizer has no BPE merges to write", "export without --gguf")
        # whether the tokenizer adds BOS/EOS itself, as it does (its files may not say)
        probe = self.tokenizer("a").input_ids
        special.add_special_token = {
            "bos": self.tokenizer.bos_token_id is not None and probe[:1] == [self.tokenizer.bos_token_id],
            "eos": self.tokenizer.eos_token_id is not None and probe[-1:] == [self.tokenizer.eos_token_id]}
        return tokens, types, special

    def vocabulary(self) -> tuple[list[str], list[int]]:
        """Every id's token and llama.cpp token type, as its converter lists them (``get_vocab_base``)."""
        tok = self.tokenizer
        size = self.config.vocab_size  # llama.cpp's vocabulary is the embedding's rows; ids past the tokenizer's pad
        by_id = {i: t for t, i in tok.get_vocab().items()}
        if max(by_id) >= size:
            raise ArtifactError(f"the base's tokenizer has ids up to {max(by_id)}, past its embedding's {size} rows",
                                "export without --gguf, or resize the model's embeddings to its tokenizer")
        added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(size):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(_UNUSED)
                continue
            if token in added:
                if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                    token = tok.decode(tok.encode(token, add_special_tokens=False))
                special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
                types.append(_CONTROL if special else _USER_DEFINED)
            else:
                types.append(_NORMAL)
            tokens.append(token)
        return tokens, types


def source_gguf(spec: str | None) -> Path | None:
    """The GGUF file a run's base model came from (the embedded default's, or a ``.gguf`` spec), else None."""
    from .models import DEFAULT_MODEL, _default_gguf_path

    if spec is None or str(spec).strip().lower() == DEFAULT_MODEL:
        return _default_gguf_path()
    path = Path(str(spec)).expanduser()
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def metadata_for(spec: str | None):
    """The metadata source of a run's base ``spec``, or one clear refusal: the base's own GGUF file where it was
    loaded from one (the embedded default, a ``.gguf`` path), else its transformers config and tokenizer."""
    from .models import load_config, load_tokenizer

    path = source_gguf(spec)
    if path is not None:
        return GGUFFileMetadata(path)
    return TransformersMetadata(load_config(spec), load_tokenizer(spec), Path(str(spec)).name or str(spec))
