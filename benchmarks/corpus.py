"""The budgets' comparisons on a second corpus, different in kind from the reference manual's prose (issue #29
item 6): Python source code. Are the search's wins over uniform quantization, and the share of the gap to 16-bit
LoRA it recovers, tuned to one corpus?

Corpus (`build_code_corpus`): the source of 13 pure-Python standard-library modules of the running Python
(``MODULES``), cut before top-level statements and methods into records of at least 2,000 characters, written once to
benchmarks/work/corpus/stdlib-code.jsonl and split as every .jsonl file is (about 90/5/5 by size); the Python
version and the file's sha256 go into the results (another Python's sources are another corpus).

Compared as benchmarks/frontier.py compares on the default data, with its settings and its final fine-tune:
``lora16``; every uniform setting of the frontier's grid that fits the largest budget (the best uniform setting
within each budget is among them) and, as the frontier has them, the grid's other group sizes at each budget
(`group_size_settings`); ``qradaptor-<budget>`` at 3.5 and 4 bits (the frontier's search, on a profile
of this corpus). Seeds: every seed for the searches' plans, for the best uniform setting within each budget (taken
again on seed means until it has them all) and for ``qlora4-r16`` (uniform 4-bit r16 with PEFT's zero start: the
gap's reference, QLoRA as a user runs it today); one for the others.

    .venv/bin/python benchmarks/corpus.py            # ~2 h on 2 cores, resumable (benchmarks/work/corpus-code)
    .venv/bin/python benchmarks/corpus.py --smoke    # a tiny random model on its word data: the script runs

Finals go to the frontier's store and ledger (keyed by the data path too). Writes benchmarks/results/corpus.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402
from benchmarks.frontier import (REFERENCE, Bench, best_uniform_within, group_size_settings, recipe,  # noqa: E402
                                 run_final, seeded, targets, targets_markdown, train_dtype, uniform_name)

ROOT = Path(__file__).resolve().parent.parent
#: Pure-Python standard-library modules: 441 KB of source on Python 3.11.7
MODULES = ("argparse", "dataclasses", "pathlib", "textwrap", "functools", "heapq", "statistics", "fractions", "shlex",
           "string", "csv", "contextlib", "copy")
CORPUS = Path("benchmarks") / "work" / "corpus" / "stdlib-code.jsonl"  # relative to the repository: a stable key
BUDGETS = ("3.5bit", "4bit")
RECORD_CHARS = 2000


def code_records(source: str, name: str, *, min_chars: int = RECORD_CHARS) -> list[dict]:
    """``source`` cut before lines that start in column 0 with a name or a decorator (top-level statements, mostly)
    or a class's ``def``/``class``/decorator (methods) into records of at least ``min_chars`` characters (fewer only
    when the whole source is); joined, they are the source."""
    starts = [0] + [m.start() + 1 for m in re.finditer(r"\n(?=[A-Za-z_@]|    (?:def |async def |class |@))", source)]
    pieces = [source[a:b] for a, b in zip(starts, starts[1:] + [len(source)])]
    records, current = [], ""
    for piece in pieces:
        current += piece
        if len(current) >= min_chars:
            records.append({"text": current, "source": name})
            current = ""
    if current:  # the tail joins the last record
        if records:
            records[-1]["text"] += current
        else:
            records.append({"text": current, "source": name})
    return records


def build_code_corpus(path: Path, modules=MODULES) -> dict:
    """Write the corpus (one JSON record per line, atomically) unless it is there; return what identifies it."""
    from qradaptor.io import atomic_write_text

    if not path.is_file():
        records = []
        for name in modules:
            records += code_records(Path(importlib.import_module(name).__file__).read_text(encoding="utf-8"), name)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    text = path.read_bytes()
    return {"path": str(path), "sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text),
            "records": text.count(b"\n"), "modules": list(modules), "python": sys.version.split()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="resumable working directory, relative to the repository "
                                                     "(default: benchmarks/work/corpus-code; with --smoke a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on its own word data: the script runs")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # the corpus path is relative to the repository, so its finals' keys are the same in any clone
    start = time.perf_counter()
    corpus = None if args.smoke else build_code_corpus(CORPUS)
    work = args.work or (None if args.smoke else str(Path("benchmarks") / "work" / "corpus-code"))
    bench = Bench(work, smoke=args.smoke, data=None if args.smoke else str(CORPUS))
    settings, dtype = bench.settings, train_dtype()

    from qradaptor.memory import predict
    from qradaptor.plan import Plan

    L = bench.shapes.num_layers
    searches, costs, kept = {}, {}, {}
    for budget in BUDGETS:
        name = f"qradaptor-{budget}"
        result = bench.search(name, budget)
        searches[name], kept[name] = result, result.kept_run
        costs[name] = {**bench.search_cost(name, result), "budget_bytes": result.budget_bytes,
                       "search_loss": result.chosen.loss}
    largest = max(r.budget_bytes for r in searches.values())
    grid = [(b, r) for b in settings["grid"]["bits"] for r in settings["grid"]["ranks"]]
    plans = [("lora16", Plan.uniform(L, 16, 16), "bfloat16"), (REFERENCE, Plan.uniform(L, 4, 16), dtype)]
    plans += [(uniform_name(b, r), Plan.uniform(L, b, r), dtype) for b, r in grid
              if predict(bench.shapes, Plan.uniform(L, b, r), bench.pricing).total_bytes <= largest]
    # the group-size lever a user could give a uniform plan too, as the frontier judges the searches with it
    plans += [(uniform_name(b, r, g), Plan.uniform(L, b, r, group_size=g), dtype) for b, r, g in
              group_size_settings(bench.shapes, bench.pricing, [r.budget_bytes for r in searches.values()],
                                  settings["grid"])]
    plans += [(name, result.chosen.plan, dtype) for name, result in searches.items()]

    rows = []
    for name, plan, row_dtype in plans:
        final = run_final(bench.finals, name, plan, recipe(name, settings), bench.model, bench.data, seed=0,
                          dtype=row_dtype,
                          init_from=str(kept[name]) if kept.get(name) else None)
        rows.append({"name": name, "plan": plan.describe(), "dtype": row_dtype, "memory_bytes": final["memory_bytes"],
                     "trainable_params": final["trainable_params"], "seeds": [final["loss"]], "loss": final["loss"],
                     "train_seconds": final["train_seconds"],
                     **costs.get(name, {"search_steps": 0, "search_seconds": 0.0})})
        print(f"corpus: {name}: test loss {final['loss']:.4f}", flush=True)
    plan_of = {name: plan for name, plan, _ in plans}
    while True:  # every seed for the compared rows, the best uniform ones taken again on seed means
        todo = [r for r in seeded(rows, "budgets") if len(r["seeds"]) < settings["seeds"]]
        if not todo:
            break
        for r in {id(r): r for r in todo}.values():
            for seed in range(len(r["seeds"]), settings["seeds"]):
                r["seeds"].append(run_final(bench.finals, f"{r['name']} seed {seed}", plan_of[r["name"]],
                                            recipe(r["name"], settings), bench.model, bench.data, seed=seed,
                                            dtype=r["dtype"])["loss"])
            r["loss"] = sum(r["seeds"]) / len(r["seeds"])
            r["loss_spread"] = max(r["seeds"]) - min(r["seeds"])
    goals = targets(rows, settings["steps"])
    payload = {"settings": {**settings, "budgets": list(BUDGETS), "dtype": dtype, "smoke": args.smoke,
                            "model": bench.model or "smollm2-135m", "data": bench.data},
               "corpus": corpus, "rows": rows, "targets": goals, "seconds": time.perf_counter() - start,
               "environment": environment()}
    md = report(rows, goals, settings, corpus, args.smoke) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    write_results("corpus-smoke" if args.smoke else "corpus", payload, md, directory=directory)
    print(md)
    return 0


def report(rows: list[dict], goals: dict, settings: dict, corpus: dict | None, smoke: bool) -> str:
    by = {r["name"]: r for r in rows}
    ref, ceiling = by[REFERENCE], by["lora16"]
    gap = ref["loss"] - ceiling["loss"]
    table = []
    for r in rows:
        fits = best_uniform_within(rows, r["budget_bytes"]) if "budget_bytes" in r else None
        recovered = (ref["loss"] - r["loss"]) / gap if gap > 0 else math.nan
        table.append([r["name"], f"{r['memory_bytes'] / 2**20:.1f}",
                      f"{r['loss']:.4f}" + (f" ± {r['loss_spread'] / 2:.4f}" if len(r["seeds"]) > 1 else ""),
                      len(r["seeds"]), f"{100 * recovered:.0f}%",
                      f"{fits['name']} {r['loss'] - fits['loss']:+.4f}" if fits else "—", r["plan"]])
    what = ("a tiny random model on its word data (smoke)" if smoke else
            f"SmolLM2-135M-Instruct, Python source code ({len(corpus['modules'])} standard-library modules of "
            f"Python {corpus['python']}: {corpus['records']} records, {corpus['bytes'] / 1e3:.0f} KB, sha256 "
            f"{corpus['sha256'][:12]}…)")
    md = (f"# A second corpus: {what}\n\n"
          f"The frontier's comparisons at the {' and '.join(BUDGETS)} budgets on this corpus (benchmarks/corpus.py): "
          f"every method {settings['steps']} LoRA steps of {settings['batch_size']}×{settings['seq_len']} tokens "
          f"(lr {settings['lr']}, adapters started `{settings['adapter_init']}`), held-out loss on the corpus's whole "
          f"test split; the searches as the frontier runs them, on a profile of this corpus. Loss ± half the "
          f"max–min spread over seeds (column seeds). `{REFERENCE}`: uniform 4-bit r16 with PEFT's zero start (QLoRA "
          f"as run today). Gap recovered = ({REFERENCE} − method) / ({REFERENCE} − "
          f"lora16). vs best uniform: the best uniform setting that fits the search's budget.\n\n")
    md += markdown_table(["method", "MiB", "test loss", "seeds", "gap recovered", "vs best uniform", "plan"], table)
    md += targets_markdown(goals)
    return md


if __name__ == "__main__":
    sys.exit(main())
