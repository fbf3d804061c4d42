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

    .venv/bin/python benchmarks/corpus.py                 # ~3 h on 2 cores, resumable (benchmarks/work/corpus-code)
    .venv/bin/python benchmarks/corpus.py --budgets 4bit  # the 4-bit comparison alone (its finals are reused)
    .venv/bin/python benchmarks/corpus.py --smoke         # a tiny random model on its word data: the script runs

The gap's rows (lora16, qlora4-r16) and the searches' plans come first with all their seeds, then the uniform grid.
Finals go to the frontier's store and ledger (keyed by the data path too). Writes benchmarks/results/corpus.{json,md}
(corpus-4bit.* for one budget) after every final: an unfinished run's results say what is not run yet.
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


def code_corpus_data() -> tuple[str, dict]:
    """The corpus as the benchmarks give it to `--data`, built on first use: its path relative to the repository,
    which becomes the working directory (the finals' keys hold the path: the same in any clone), and what identifies
    it (its sha256 and Python version: another Python's sources are another corpus)."""
    os.chdir(ROOT)
    return str(CORPUS), build_code_corpus(CORPUS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="resumable working directory, relative to the repository "
                                                     "(default: benchmarks/work/corpus-code; with --smoke a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on its own word data: the script runs")
    parser.add_argument("--budgets", type=_budgets, default=BUDGETS, metavar="B,B",
                        help=f"the budgets compared (default {','.join(BUDGETS)}): one of them alone is a shorter run "
                             "whose finals the other's reuses")
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
    for budget in args.budgets:
        name = f"qradaptor-{budget}"
        result = bench.search(name, budget)
        searches[name], kept[name] = result, result.kept_run
        costs[name] = {**bench.search_cost(name, result), "budget_bytes": result.budget_bytes,
                       "search_loss": result.chosen.loss}
    largest = max(r.budget_bytes for r in searches.values())
    grid = [(b, r) for b in settings["grid"]["bits"] for r in settings["grid"]["ranks"]]
    # the gap's rows and the searches first, with all their seeds: the 4-bit target is measured before the grid
    first = [("lora16", Plan.uniform(L, 16, 16), "bfloat16"), (REFERENCE, Plan.uniform(L, 4, 16), dtype)]
    first += [(name, result.chosen.plan, dtype) for name, result in searches.items()]
    then = [(uniform_name(b, r), Plan.uniform(L, b, r), dtype) for b, r in grid
            if predict(bench.shapes, Plan.uniform(L, b, r), bench.pricing).total_bytes <= largest]
    # the group-size lever a user could give a uniform plan too, as the frontier judges the searches with it
    then += [(uniform_name(b, r, g), Plan.uniform(L, b, r, group_size=g), dtype) for b, r, g in
             group_size_settings(bench.shapes, bench.pricing, [r.budget_bytes for r in searches.values()],
                                 settings["grid"])]
    plan_of = {name: (plan, row_dtype) for name, plan, row_dtype in first + then}
    payload = {"settings": {**settings, "budgets": list(args.budgets), "dtype": dtype, "smoke": args.smoke,
                            "model": bench.model or "smollm2-135m", "data": bench.data}, "corpus": corpus}
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    rows = []

    def publish() -> str:
        """Write the results so far: a run stopped after hours still leaves what it measured (marked partial)."""
        done = {r["name"] for r in rows}
        pending = [name for name in plan_of if name not in done]
        pending += [f"{r['name']} ({settings['seeds'] - len(r['seeds'])} seeds)" for r in seeded(rows, "budgets")
                    if len(r["seeds"]) < settings["seeds"]]
        goals = targets(rows, settings["steps"]) if {"lora16", REFERENCE} <= done else None
        payload.update(rows=rows, targets=goals, pending=pending, seconds=time.perf_counter() - start,
                       environment=environment())
        md = report(rows, goals, payload["settings"], corpus, args.smoke, pending)
        md += f"\nCPU: {describe_cpu(payload['environment'])}.\n"
        write_results("corpus-smoke" if args.smoke else _results_name(args.budgets), payload, md, directory=directory)
        return md

    for name, plan, row_dtype in first:
        rows.append(_final_row(bench, name, plan, row_dtype, settings, kept.get(name), costs.get(name)))
        publish()
    _all_seeds(bench, rows, plan_of, settings, publish)
    for name, plan, row_dtype in then:
        rows.append(_final_row(bench, name, plan, row_dtype, settings, kept.get(name), costs.get(name)))
        publish()
    _all_seeds(bench, rows, plan_of, settings, publish)
    print(publish())
    return 0


def _budgets(text: str) -> tuple[str, ...]:
    chosen = tuple(b.strip() for b in text.split(",") if b.strip())
    if not chosen or any(b not in BUDGETS for b in chosen):
        raise argparse.ArgumentTypeError(f"budgets are among {','.join(BUDGETS)}, got {text!r}")
    return tuple(b for b in BUDGETS if b in chosen)


def _results_name(budgets: tuple[str, ...]) -> str:
    """corpus, or corpus-4bit for a run of one budget (its rows are a subset of the whole run's)."""
    return "corpus" if tuple(budgets) == BUDGETS else "corpus-" + "-".join(budgets)


def _final_row(bench, name, plan, dtype, settings, kept, cost) -> dict:
    """Seed 0's final of ``plan`` (continuing the search's kept run where there is one) as a results row."""
    final = run_final(bench.finals, name, plan, recipe(name, settings), bench.model, bench.data, seed=0, dtype=dtype,
                      init_from=str(kept) if kept else None)
    print(f"corpus: {name}: test loss {final['loss']:.4f}", flush=True)
    return {"name": name, "plan": plan.describe(), "dtype": dtype, "memory_bytes": final["memory_bytes"],
            "trainable_params": final["trainable_params"], "seeds": [final["loss"]], "loss": final["loss"],
            "train_seconds": final["train_seconds"], **(cost or {"search_steps": 0, "search_seconds": 0.0})}


def _all_seeds(bench, rows, plan_of, settings, publish) -> None:
    """Every seed for the compared rows (`seeded`), the best uniform ones taken again on seed means until they have
    them all."""
    while True:
        todo = [r for r in seeded(rows, "budgets") if len(r["seeds"]) < settings["seeds"]]
        if not todo:
            return
        for r in {id(r): r for r in todo}.values():
            plan, dtype = plan_of[r["name"]]
            for seed in range(len(r["seeds"]), settings["seeds"]):
                r["seeds"].append(run_final(bench.finals, f"{r['name']} seed {seed}", plan, recipe(r["name"], settings),
                                            bench.model, bench.data, seed=seed, dtype=dtype)["loss"])
                r["loss"] = sum(r["seeds"]) / len(r["seeds"])
                r["loss_spread"] = max(r["seeds"]) - min(r["seeds"])
                publish()


def report(rows: list[dict], goals: dict | None, settings: dict, corpus: dict | None, smoke: bool,
           pending: list[str] = ()) -> str:
    by = {r["name"]: r for r in rows}
    ref, ceiling = by.get(REFERENCE), by.get("lora16")
    gap = ref["loss"] - ceiling["loss"] if ref and ceiling else math.nan
    table = []
    for r in rows:
        fits = best_uniform_within(rows, r["budget_bytes"]) if "budget_bytes" in r and not pending else None
        recovered = f"{100 * (ref['loss'] - r['loss']) / gap:.0f}%" if gap > 0 else "—"
        table.append([r["name"], f"{r['memory_bytes'] / 2**20:.1f}",
                      f"{r['loss']:.4f}" + (f" ± {r['loss_spread'] / 2:.4f}" if len(r["seeds"]) > 1 else ""),
                      len(r["seeds"]), recovered,
                      f"{fits['name']} {r['loss'] - fits['loss']:+.4f}" if fits else "—", r["plan"]])
    what = ("a tiny random model on its word data (smoke)" if smoke else
            f"SmolLM2-135M-Instruct, Python source code ({len(corpus['modules'])} standard-library modules of "
            f"Python {corpus['python']}: {corpus['records']} records, {corpus['bytes'] / 1e3:.0f} KB, sha256 "
            f"{corpus['sha256'][:12]}…)")
    md = (f"# A second corpus: {what}\n\n"
          f"The frontier's comparisons at the {' and '.join(settings['budgets'])} budgets on this corpus "
          f"(benchmarks/corpus.py): every method {settings['steps']} LoRA steps of {settings['batch_size']}×"
          f"{settings['seq_len']} tokens (lr {settings['lr']}, adapters started `{settings['adapter_init']}`), "
          f"held-out loss on the corpus's whole test split; the searches as the frontier runs them, on a profile of "
          f"this corpus. Loss ± half the max–min spread over seeds (column seeds). `{REFERENCE}`: uniform 4-bit r16 "
          f"with PEFT's zero start (QLoRA as run today). Gap recovered = ({REFERENCE} − method) / ({REFERENCE} − "
          f"lora16). vs best uniform: the best uniform setting that fits the search's budget.\n\n")
    if pending:
        md += (f"**Partial results**: the run is not finished (it resumes where it stopped). Not run yet: "
               f"{', '.join(pending)}. The comparisons with the best uniform setting wait for the whole grid.\n\n")
    md += markdown_table(["method", "MiB", "test loss", "seeds", "gap recovered", "vs best uniform", "plan"], table)
    if goals and not pending:
        md += targets_markdown(goals)
    elif goals and goals["gap_recovered_at_4bit"] is not None:
        md += (f"\nGap between {REFERENCE} and lora16 recovered at the 4-bit budget so far: "
               f"{100 * goals['gap_recovered_at_4bit']:.0f}% (target ≥ 50%).\n")
    return md


if __name__ == "__main__":
    sys.exit(main())
