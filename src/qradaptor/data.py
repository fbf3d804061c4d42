"""Fine-tuning data: load records, tokenize them with loss masks, pack them into fixed-length blocks.

A *record* is one of three shapes (the same for JSONL/JSON files, Hugging Face datasets and the default):

- text:   ``{"text": str}``                                         -- every token is trained on
- alpaca: ``{"instruction": str, "input": str (optional), "output": str}`` -- only the response is
- chat:   ``{"messages": [{"role": str, "content": str}, ...]}``       -- only assistant turns are

Without a source the default corpus is CPython's own reference-manual topics (``pydoc_data.topics``,
~113k SmolLM2 tokens; ~105k once the held-out splits drop the paragraphs training holds), so the tool works offline
with nothing but Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .io import read_text

logger = logging.getLogger(__name__)

DEFAULT_DATA = "pydoc-topics"
SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100
MIN_RECORDS_TO_SPLIT = 20

# Fractions of the text (by size, not by record count) each split gets.
_DEFAULT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
_FILE_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}
_FILE_SUFFIXES = (".jsonl", ".json", ".txt")
# Suffixes that mark a string as meant to be a file path rather than a Hugging Face dataset name.
_PATHLIKE_SUFFIXES = _FILE_SUFFIXES + (".csv", ".tsv", ".parquet", ".gz", ".md", ".arrow")
# Bump when tokenization or the templates change, so caches keyed by data_fingerprint are invalidated.
_FORMAT_VERSION = "qradaptor-data-1"

# The Stanford Alpaca prompt. The Input section is left out when the record has no (or an empty) input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_FORMATS_HELP = (
    'one JSON object per line: {"text": str}, or {"instruction": str, "input": str (optional), '
    '"output": str}, or {"messages": [{"role": str, "content": str}, ...]}'
)


@dataclass
class TokenBlocks:
    """Packed training data: equal-length blocks; ``labels`` is -100 where no loss is taken."""

    input_ids: torch.LongTensor  # (n_blocks, seq_len)
    labels: torch.LongTensor  # (n_blocks, seq_len)

    def __post_init__(self):
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and labels {tuple(self.labels.shape)} differ")

    @property
    def num_tokens(self) -> int:
        """Positions that carry a label (what the loss is averaged over)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, n: int) -> TokenBlocks:
        """The first ``n`` blocks (deterministic, so a cheap evaluation sees a fixed prefix of the data)."""
        return TokenBlocks(self.input_ids[:n], self.labels[:n])


# --------------------------------------------------------------------------------------------- records


def _check_record(obj, where: str) -> dict:
    """Validate one raw object and return it in its canonical shape; ``where`` names it in errors."""
    fix = f"expected {_FORMATS_HELP}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", fix)

    def need_str(key, value):
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}", fix)
        return value

    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects", fix)
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content'", fix)
            out.append({"role": need_str(f"messages[{j}].role", m["role"]),
                        "content": need_str(f"messages[{j}].content", m["content"])})
        return {"messages": out}
    if "instruction" in obj or "output" in obj:
        if "instruction" not in obj or "output" not in obj:
            raise DataError(f"{where}: an alpaca record needs both 'instruction' and 'output'", fix)
        inp = obj.get("input")
        return {"instruction": need_str("instruction", obj["instruction"]),
                "input": "" if inp is None else need_str("input", inp),
                "output": need_str("output", obj["output"])}
    if "text" in obj:
        return {"text": need_str("text", obj["text"])}
    raise DataError(f"{where}: none of 'text', 'instruction'/'output' or 'messages' found "
                    f"(keys: {sorted(obj)[:8]})", fix)


def _read_jsonl(path: Path, lines=None) -> list[dict]:
    records = []
    for lineno, line in enumerate(lines if lines is not None else read_text(path, DataError, "data file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})",
                            f"expected {_FORMATS_HELP}") from None
        records.append(_check_record(obj, f"{path}: line {lineno}"))
    return records


def _read_json(path: Path) -> list[dict]:
    text = read_text(path, DataError, "data file")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved under a .json name
            return _read_jsonl(path, text.splitlines())
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                        "a .json file must hold a list of records; use .jsonl for one record per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}",
                        f"write a list of records, each {_FORMATS_HELP.removeprefix('one JSON object per line: ')}")
    return [_check_record(obj, f"{path}: index {i}") for i, obj in enumerate(data)]


_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")  # a blank line


def _read_txt(path: Path) -> list[dict]:
    """Paragraphs (separated by blank lines) become text records."""
    paragraphs = _PARAGRAPH.split(read_text(path, DataError, "data file"))
    return [{"text": p.strip()} for p in paragraphs if p.strip()]


def _looks_like_path(source: str) -> bool:
    """Hugging Face dataset ids are ``name`` or ``owner/name``; anything else is meant as a file."""
    return (
        source.startswith((".", "~", os.sep, "/"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or source.lower().endswith(_PATHLIKE_SUFFIXES)
    )


def _assign_splits(keys: list[str], sizes: list[int], fractions: dict[str, float]) -> list[str]:
    """Deterministic split: walk the items in sha256 order and give each to the split that is furthest
    below its share of the text seen so far. Hashing spreads the held-out items over the whole source, and
    balancing by size keeps every split near its share even when a few items are huge (bucketing the
    default corpus by hash alone left the test split with 3.6k of 113k tokens)."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    assigned = dict.fromkeys(fractions, 0)
    out = [""] * len(keys)
    seen = 0
    for i in order:
        seen += sizes[i]
        split = max(fractions, key=lambda s: fractions[s] * seen - assigned[s])
        assigned[split] += sizes[i]
        out[i] = split
    return out


def _split_labels(records: list[dict], seed: int, name: str) -> list[str] | None:
    """The split of each record, or None when there are too few records to hold any out."""
    if len(records) < MIN_RECORDS_TO_SPLIT:
        logger.warning("%s has only %d records (< %d): every split uses all of them, so validation and test "
                       "are not held out", name, len(records), MIN_RECORDS_TO_SPLIT)
        return None
    sizes = [len(json.dumps(r, ensure_ascii=False)) for r in records]
    return _assign_splits([f"{seed}:{i}" for i in range(len(records))], sizes, _FILE_FRACTIONS)


def _split_records(records: list[dict], split: str, seed: int, name: str) -> list[dict]:
    labels = _split_labels(records, seed, name)
    return records if labels is None else [r for r, s in zip(records, labels) if s == split]


def default_topic_splits() -> dict[str, list[str]]:
    """The default corpus's topics, split by topic (fixed, seed-independent): each split's texts, whole."""
    from pydoc_data.topics import topics

    by_text: dict[str, str] = {}
    for name in sorted(topics):  # some topics are aliases with identical text ('if', 'else'): keep one
        by_text.setdefault(topics[name], name)
    names = sorted(by_text.values())
    splits = _assign_splits(names, [len(topics[n]) for n in names], _DEFAULT_FRACTIONS)
    return {split: [topics[n] for n, s in zip(names, splits) if s == split] for split in SPLITS}


def _words(text: str) -> str:
    return " ".join(text.split())


def unseen_paragraphs(texts: list[str], seen: list[str]) -> list[str]:
    """``texts`` without the paragraphs that ``seen`` holds verbatim (whitespace aside); texts left empty are
    dropped. The reference manual's topics nest (``specialnames`` holds nearly all of ``customization``, ``compound``
    most of ``if``, ``while`` and ``async``), so splitting by topic alone left 62% of the test split's 13-word runs
    in the training split (benchmarks/results/overlap.md): a held-out loss that partly measured recall."""
    known = "\n".join(_words(t) for t in seen)
    out = []
    for text in texts:
        kept = [p.strip() for p in _PARAGRAPH.split(text) if p.strip() and _words(p) not in known]
        if kept:
            out.append("\n\n".join(kept))
    return out


def _load_default(split: str) -> list[dict]:
    """One split of the default corpus. Training keeps its topics whole; validation keeps what training does not
    hold, and test what neither training nor validation holds (`unseen_paragraphs`)."""
    texts = default_topic_splits()
    earlier = list(SPLITS[:SPLITS.index(split)])
    held = texts[split] if not earlier else unseen_paragraphs(texts[split], [t for s in earlier for t in texts[s]])
    return [{"text": t} for t in held]


def _load_hf(name: str, split: str, seed: int) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"data {name!r} is not a local file, so it was taken as a Hugging Face dataset name, "
                        "but the optional package `datasets` is not installed",
                        "pip install datasets==5.2.0, or pass a .jsonl, .json or .txt file") from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown name, gated, ...: all fixable by the user
        raise DataError(f"could not load Hugging Face dataset {name!r}: {type(e).__name__}: {e}",
                        "check the name and the network (or pre-download it into the HF cache), "
                        "or pass a local .jsonl, .json or .txt file") from None
    # The dataset's own split if it has it; a missing one is carved out of its train split by hashing,
    # and then train gives up those records, so no record is in two splits.
    base = "train" if "train" in ds else next(iter(ds))
    if split in ds and split != base:
        return [_check_record(row, f"dataset {name!r} split {split!r} row {i}") for i, row in enumerate(ds[split])]
    records = [_check_record(row, f"dataset {name!r} split {base!r} row {i}") for i, row in enumerate(ds[base])]
    labels = _split_labels(records, seed, f"dataset {name!r}")
    if labels is None:
        return records
    native = {s for s in SPLITS if s in ds and s != base}
    return [r for r, s in zip(records, labels) if s == split or (split == base and s in native)]


def load_records(source: str | os.PathLike | None, split: str = "train", *, seed: int = 0) -> list[dict]:
    """Records of one split of ``source``, each in its canonical shape (see the module docstring).

    ``source`` is ``None``/``"pydoc-topics"`` (the default corpus, split by topic; the split is fixed and
    ignores ``seed`` so every run is measured on the same held-out topics), a ``.jsonl``/``.json``/``.txt``
    file, or a Hugging Face dataset name. Files are split by record, deterministically from ``seed``:
    ~90% train, 5% validation, 5% test. A file with fewer than 20 records is too small to hold anything
    out: then every split gets all records (and a warning is logged).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    if source is None or str(source) == DEFAULT_DATA:
        return _load_default(split)

    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and not _looks_like_path(source):
            records = _load_hf(source, split, seed)
            if not records:
                raise DataError(f"empty dataset: Hugging Face dataset {source!r} split {split!r} has no records",
                                "pick a dataset or split that has rows")
            return records
        raise DataError(f"data file not found: {path}", "check the path (or leave --data out for the default corpus)")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}", "pass a .jsonl, .json or .txt file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(f"unsupported data file type {suffix or '(none)'!r}: {path}",
                        "use .jsonl (one record per line), .json (a list of records) or .txt (paragraphs)")
    records = readers[suffix](path)
    if not records:
        raise DataError(f"empty dataset: {path} has no records", f"add records: {_FORMATS_HELP}")
    records = _split_records(records, split, seed, str(path))
    if not records:
        raise DataError(f"empty dataset: split {split!r} of {path} has no records", "add more records")
    return records


# ---------------------------------------------------------------------------------------- tokenization


def _chat_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and find the character span of each assistant turn (content + its end-of-turn token).

    The spans come from rendering prefixes: everything up to the generation prompt before an assistant
    turn is prompt, everything up to the end of that turn is response. A template whose renders are not
    prefixes of one another (e.g. one that rewrites earlier turns) cannot be masked this way.
    """

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raises for chats a template refuses (e.g. roles not alternating)
            raise DataError(f"{where}: the tokenizer's chat template refused this chat: {e}",
                            "fix the chat (roles, order) or convert it to alpaca or text records") from None

    text = render(messages, False).rstrip()
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        turn = render(messages[: i + 1], False).rstrip()
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise DataError(f"{where}: the tokenizer's chat template does not render this chat turn by turn "
                            "(or it starts with an assistant turn), so the assistant turns cannot be located "
                            "for loss masking",
                            "start chats with a user or system turn, or convert the data to alpaca or text records")
        spans.append((len(prompt), len(turn)))
    return text, spans


def _tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` once (so tokens match what the model sees at inference) and label the tokens that
    start inside a span; tokenizers without offsets fall back to tokenizing piece by piece."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                  for t, (s, _) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    ids, labels, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, loss in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += piece_ids
                labels += piece_ids if loss else [IGNORE_INDEX] * len(piece_ids)
        pos = b
    return ids, labels


def tokenize_records(records: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per record, each ending with eos; ``labels`` is -100 where no loss is taken.

    text: every token (and the eos) is trained on. alpaca: rendered with ``ALPACA_PROMPT`` (or
    ``ALPACA_PROMPT_NO_INPUT``); only the output and the eos are trained on. chat: rendered with the
    tokenizer's chat template; only the assistant turns (with their end-of-turn token) are trained on.
    A BOS token is added only if the tokenizer adds one by itself; it is never trained on.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token, which packing needs between documents",
                        "use a tokenizer that defines eos_token")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    out = []
    for i, rec in enumerate(records):
        rec = _check_record(rec, f"record {i}")
        if "messages" in rec:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError("chat data (records with 'messages') needs a tokenizer with a chat template, "
                                "and this tokenizer has none",
                                "use an instruct/chat model's tokenizer, or convert the data to alpaca or text records")
            text, spans = _chat_spans(rec["messages"], tokenizer, f"record {i}")
            ids, labels = _tokenize_spans(tokenizer, text, spans)
        elif "text" in rec:
            ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"]
            labels = list(ids)
        else:
            template = ALPACA_PROMPT if rec["input"] else ALPACA_PROMPT_NO_INPUT
            prompt = template.format(instruction=rec["instruction"], input=rec["input"])
            text, spans = prompt + rec["output"], [(len(prompt), len(prompt) + len(rec["output"]))]
            ids, labels = _tokenize_spans(tokenizer, text, spans)
        if adds_bos and "messages" not in rec:  # chat templates write their own BOS into the text
            ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
        if not ids or ids[-1] != eos:  # the eos is trained on when the tokens before it are
            last_is_loss = bool(labels) and labels[-1] != IGNORE_INDEX
            ids, labels = ids + [eos], labels + [eos if last_is_loss else IGNORE_INDEX]
        out.append((ids, labels))
    return out


#: a tokenizer that turns at least this share of the data into its unknown token is not the data's tokenizer
UNKNOWN_SHARE = 0.5


def check_tokens(examples: list[tuple[list[int], list[int]]], tokenizer, what: str, model=None) -> None:
    """Refuse data the tokenizer cannot represent, before any work: no tokens at all (a tokenizer of another
    kind than its vocabulary, e.g. a byte-level class over a word-level vocabulary), mostly unknown tokens, or
    ids beyond ``model``'s embedding rows (a tokenizer that is not the model's)."""
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    content = [t for ids, _ in examples for t in ids if t not in specials]
    name = f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '') or 'no path'})"
    model_name = None
    if model is not None:
        config = getattr(model, "config", None)
        model_name = getattr(config, "_name_or_path", "") or type(model).__name__
    if not content:
        raise DataError(f"the tokenizer {name} turns {what} into no tokens",
                        "use the tokenizer the model was trained with (a tokenizer.json/tokenizer_config.json "
                        "beside the weights whose class matches its vocabulary)" +
                        (f"; the model is {model_name}" if model_name else ""))
    unk = tokenizer.unk_token_id
    if unk is not None:
        share = sum(t == unk for t in content) / len(content)
        if share >= UNKNOWN_SHARE:
            raise DataError(f"the tokenizer {name} turns {share:.0%} of {what} into its unknown token "
                            f"{tokenizer.unk_token!r}", "use the model's own tokenizer, or data in a language and "
                            "script its vocabulary covers" + (f"; the model is {model_name}" if model_name else ""))
    if model is not None:
        rows = model.get_input_embeddings().num_embeddings
        top = max(max(ids) for ids, _ in examples if ids)
        if top >= rows:
            raise DataError(f"the tokenizer {name} produces id {top} for {what}, but the model {model_name} "
                            f"embeds only {rows} tokens (ids 0..{rows - 1})",
                            "use the model's own tokenizer (this one is of another model or a larger vocabulary)")


# --------------------------------------------------------------------------------------------- packing


def _pack(examples, seq_len: int, eos_token_id: int, what: str) -> TokenBlocks:
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}", "pass a larger seq_len")
    ids: list[int] = []
    labels: list[int] = []
    for ex_ids, ex_labels in examples:
        if len(ex_ids) != len(ex_labels):
            raise ValueError(f"input_ids ({len(ex_ids)}) and labels ({len(ex_labels)}) differ in length")
        ids += ex_ids
        labels += ex_labels
        if not ex_ids or ex_ids[-1] != eos_token_id:
            ids.append(eos_token_id)
            labels.append(eos_token_id if ex_labels and ex_labels[-1] != IGNORE_INDEX else IGNORE_INDEX)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(f"{what} has only {len(ids)} tokens, but at least {seq_len} are needed for one block "
                        f"of seq_len {seq_len}", "add more data, or pass a smaller --seq-len")
    input_ids = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    block_labels = torch.tensor(labels[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    # A causal LM never predicts position 0 of a block; a block with no other label would give a NaN loss.
    useful = (block_labels[:, 1:] != IGNORE_INDEX).any(dim=1)
    if not bool(useful.all()):
        logger.info("dropping %d of %d blocks of %s that hold no loss tokens",
                    int((~useful).sum()), n_blocks, what)
        input_ids, block_labels = input_ids[useful], block_labels[useful]
        if len(input_ids) == 0:
            raise DataError(f"{what}: no block of seq_len {seq_len} holds a token to train on "
                            "(prompts are longer than the blocks)", "use a larger seq_len or shorter prompts")
    return TokenBlocks(input_ids, block_labels)


def pack(examples, seq_len: int, eos_token_id: int) -> TokenBlocks:
    """Concatenate examples (each followed by eos unless it already ends with one) and cut the stream into
    consecutive blocks of ``seq_len``; the last partial block is dropped, and so are blocks with no loss
    position after the first. No padding, so every position of every block is real data."""
    return _pack(examples, seq_len, eos_token_id, "the data")


def load_blocks(source: str | os.PathLike | None, tokenizer, split: str = "train", *, seq_len: int = 256,
                max_blocks: int | None = None, seed: int = 0, model=None) -> TokenBlocks:
    """``load_records`` → ``tokenize_records`` → `check_tokens` (against ``model``'s embedding when given) →
    ``pack``, then the first ``max_blocks`` blocks."""
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"max_blocks must be at least 1, got {max_blocks}", "pass a positive number or None")
    records = load_records(source, split, seed=seed)
    name = DEFAULT_DATA if source is None else str(source)
    examples = tokenize_records(records, tokenizer)
    check_tokens(examples, tokenizer, f"split {split!r} of {name}", model)
    blocks = _pack(examples, seq_len, tokenizer.eos_token_id, f"split {split!r} of {name}")
    return blocks if max_blocks is None else blocks.subset(max_blocks)


def data_fingerprint(source: str | os.PathLike | None, split: str = "train", seq_len: int = 256, *,
                     max_blocks: int | None = None, seed: int = 0) -> str:
    """sha256 (hex) of the resolved records and the settings, for cache keys. It covers the data, not the
    tokenizer: combine it with the model's fingerprint, which fixes the tokenizer."""
    h = hashlib.sha256()
    settings = {"version": _FORMAT_VERSION, "split": split, "seq_len": seq_len, "max_blocks": max_blocks,
                "seed": seed}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for rec in load_records(source, split, seed=seed):
        h.update(b"\n")
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()
