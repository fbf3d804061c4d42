"""How much of each held-out split the training split holds verbatim (issue #29: is the test loss held out?)

A higher learning rate gained 4x as much on the default corpus's test split as on its validation split
(results/recipe.md, session 33). The reference manual's topics nest: ``specialnames`` holds nearly all of
``customization``, ``compound`` most of ``if``, ``while`` and ``async``. Splitting them by topic put a topic in a
held-out split and its container in training. This benchmark counts, for every run of N words of a held-out split
(whitespace-separated words, N = 8, 13, 25), whether the same run occurs in the training split (for test: in
training or validation), for

    pydoc-topics, by topic     the default corpus split by topic alone (what every result before this used)
    pydoc-topics               the default corpus as `load_records` gives it now (held-out paragraphs training
                               already holds are dropped: qradaptor.data.unseen_paragraphs)
    stdlib-code                benchmarks/corpus.py's second corpus (a .jsonl file, split by record)

and the SmolLM2 tokens and 256-token blocks each split has. Seconds on 2 cores; no model runs.

    .venv/bin/python benchmarks/overlap.py
    .venv/bin/python benchmarks/overlap.py --smoke      # one N on the default corpus: the script runs

Writes benchmarks/results/overlap.{json,md} (a smoke run: into a temp dir).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402

HELD_OUT = ("validation", "test")


def runs(texts: list[str], n: int) -> list[tuple[str, ...]]:
    """Every run of ``n`` consecutive words in each text (runs do not cross texts)."""
    out = []
    for text in texts:
        words = re.findall(r"\S+", text)
        out += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return out


def overlap(splits: dict[str, list[str]], n: int) -> dict[str, float | None]:
    """Per held-out split: the share of its ``n``-word runs that an earlier split (training; for test also
    validation) holds."""
    out = {}
    for i, split in enumerate(HELD_OUT):
        known = set(runs([t for s in ("train",) + HELD_OUT[:i] for t in splits[s]], n))
        mine = runs(splits[split], n)
        out[split] = sum(r in known for r in mine) / len(mine) if mine else None
    return out


def corpus_row(name: str, splits: dict[str, list[str]], tokenizer, ns: tuple[int, ...]) -> dict:
    from qradaptor.data import pack, tokenize_records

    sizes = {}
    for split, texts in splits.items():
        examples = tokenize_records([{"text": t} for t in texts], tokenizer)
        blocks = pack(examples, 256, tokenizer.eos_token_id)
        sizes[split] = {"records": len(texts), "chars": sum(map(len, texts)),
                        "tokens": sum(len(ids) for ids, _ in examples), "blocks_256": len(blocks)}
    return {"corpus": name, "sizes": sizes, "overlap": {str(n): overlap(splits, n) for n in ns}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one run length, the default corpus only")
    parser.add_argument("--work", default=None, help="with --smoke: where its results go (default: a temp dir)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    from qradaptor.data import SPLITS, default_topic_splits, load_records
    from qradaptor.models import load_tokenizer

    tokenizer = load_tokenizer(None)
    ns = (13,) if args.smoke else (8, 13, 25)
    loaded = lambda source: {s: [r["text"] for r in load_records(source, s)] for s in SPLITS}  # noqa: E731
    rows = [corpus_row("pydoc-topics, by topic", default_topic_splits(), tokenizer, ns),
            corpus_row("pydoc-topics", loaded(None), tokenizer, ns)]
    if not args.smoke:
        from benchmarks.corpus import CORPUS, build_code_corpus

        build_code_corpus(CORPUS)
        rows.append(corpus_row("stdlib-code", loaded(str(CORPUS)), tokenizer, ns))
    payload = {"ns": list(ns), "rows": rows, "smoke": args.smoke, "seconds": time.perf_counter() - began,
               "environment": environment()}
    md = report(payload) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    work = Path(args.work or tempfile.mkdtemp(prefix="qradaptor-overlap-")) if args.smoke else RESULTS
    write_results("overlap-smoke" if args.smoke else "overlap", payload, md, directory=work)
    print(md)
    return 0


def report(payload: dict) -> str:
    ns = payload["ns"]
    table = []
    for row in payload["rows"]:
        for split in ("train",) + HELD_OUT:
            size = row["sizes"][split]
            shares = [row["overlap"][str(n)].get(split) if split != "train" else None for n in ns]
            table.append([row["corpus"], split, size["records"], size["chars"], size["tokens"], size["blocks_256"]]
                         + ["" if v is None else f"{100 * v:.1f}%" for v in shares])
    return ("# Held-out text the training split holds verbatim\n\n"
            "Share of each held-out split's runs of N words (whitespace-separated) that occur in the training split "
            "(test: in training or validation). Tokens: SmolLM2's tokenizer; blocks: 256-token blocks, as `train` "
            "and a final fine-tune's test loss read them.\n\n"
            + markdown_table(["corpus", "split", "records", "characters", "tokens", "256-token blocks"]
                             + [f"{n}-word runs seen" for n in ns], table) + "\n")


if __name__ == "__main__":
    sys.exit(main())
