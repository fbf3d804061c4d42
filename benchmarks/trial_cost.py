"""Where a search trial's seconds go besides its fine-tune steps (issue #29: the default `run`'s search costs 0.44× the
final fine-tune in steps but 0.55–0.59× in wall time, results/run_stages*.md; the target is 0.5×).

Runs the default search's fitness (`FineTuneFitness` with `SearchConfig`'s defaults: the activation start, the cheap
fidelity's 8 steps judged on 8 validation blocks, the full fidelity's 16 on 16, each on the first steps of a 200-step
schedule) on SmolLM2-135M-Instruct and the default data, in the dtype `run` trains in, for the trials a search's
first evaluations are like:

    4b r16 cheap     the first plan: every linear quantized at 4 bits and its start fitted (once per bit-width)
    5b r4 cheap      a second bit-width: quantized and fitted again
    4b/5b mixed      a plan of widths already seen: nothing to quantize or fit
    4b r16 full      the first plan promoted: its kept run continued from step 8 to 16

Each part is timed by wrapping the library function that does it (the same calls a search makes; nested parts are
reported apart: steps = training less its evaluations and saves): building the plan's model (quantizing the linears
the cache lacks, attaching PEFT's adapters), fitting the starts the plan lacks (and within it the SVDs, the Cholesky
factors and solves, the quantization errors; the rest is the forward on the calibration tokens and the inputs' second
moments), the fine-tune steps, evaluating, saving the kept run. Then what a search does instead before its first
trial: the first two plans' widths quantized and fitted together in one calibration forward (`FineTuneFitness.prefit`),
against what the two trials paid for them one at a time.

    .venv/bin/python benchmarks/trial_cost.py            # ~5 min on 2 cores, on a quiet machine
    .venv/bin/python benchmarks/trial_cost.py --smoke    # a tiny random model: the script runs

Writes benchmarks/results/trial_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402

#: (label in the results, module, attribute): the library calls a trial's parts are made of
PARTS = (("build: quantize", "qradaptor.quantize", "quantize_model"),  # the copy, and the linears the cache lacks
         ("build: adapters", "qradaptor.quantize", "add_adapters"),
         ("start: fit", "qradaptor.adapter_init", "AdapterStart.factors"),
         ("start: apply", "qradaptor.adapter_init", "apply_start"),
         ("train", "qradaptor.train", "train"),
         ("evaluate", "qradaptor.evaluate", "evaluate_loss"),
         ("save", "qradaptor.train", "save_checkpoint"),
         ("fit: SVD", "torch.linalg", "svd"),
         ("fit: Cholesky and solve", "torch.linalg", "cholesky"),
         ("fit: Cholesky and solve", "torch.linalg", "solve_triangular"),
         ("fit: quantization error", "qradaptor.adapter_init", "AdapterStart._error"),
         ("quantize", "qradaptor.backends.base", "QuantCache.get"))  # within the others; in the up-front fit all misses


@contextmanager
def timing_parts(seconds: dict):
    """Add each part's seconds to ``seconds`` while inside (the wrapped functions are restored on leaving)."""
    restore = []
    for label, module_name, attribute in PARTS:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            began = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - began

        setattr(owner, name, timed)
        restore.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def measure(model_spec, data, *, smoke: bool, work: Path) -> dict:
    import torch

    from benchmarks.frontier import train_dtype
    from qradaptor.models import load_base
    from qradaptor.plan import Plan
    from qradaptor.search import Fidelity, FineTuneFitness, SearchConfig

    dtype = train_dtype()
    loaded = load_base(model_spec, dtype=getattr(torch, dtype))
    config = SearchConfig(budget_bytes=1 << 62, **({"seq_len": 32} if smoke else {}))
    schedule = 4 if smoke else 200  # a default `run`'s final fine-tune, whose first steps the trials are
    cheap = Fidelity("cheap", steps=2 if smoke else config.cheap.steps, eval_blocks=config.cheap.eval_blocks,
                     schedule_steps=schedule)
    full = Fidelity("full", steps=4 if smoke else config.full.steps, eval_blocks=config.full.eval_blocks,
                    schedule_steps=schedule)
    fitness = FineTuneFitness(loaded.model, loaded.tokenizer, data=data, config=config, runs=work / "runs")
    layers = loaded.model.config.num_hidden_layers
    half = layers // 2
    trials = [("4b r16 cheap", Plan.uniform(layers, 4, 16), cheap), ("5b r4 cheap", Plan.uniform(layers, 5, 4), cheap),
              ("4b/5b mixed cheap", Plan(Plan.uniform(half, 4, 16).layers + Plan.uniform(layers - half, 5, 4).layers),
               cheap),
              ("4b r16 full", Plan.uniform(layers, 4, 16), full)]
    rows = []
    for label, plan, fidelity in trials:
        seconds = defaultdict(float)
        began = time.perf_counter()
        with timing_parts(seconds):
            loss, steps = fitness(plan, fidelity)
        total = time.perf_counter() - began
        parts = dict(seconds)
        parts["steps"] = parts.pop("train") - parts.get("evaluate", 0.0) - parts.get("save", 0.0)
        rows.append({"trial": label, "plan": plan.describe(), "fidelity": fidelity.name, "steps": steps,
                     "eval_blocks": fidelity.eval_blocks, "loss": loss, "seconds": total, "parts": parts,
                     "seconds_per_step": parts["steps"] / steps,
                     "beyond_steps": total - parts["steps"]})
        print(f"trial_cost: {label}: {total:.1f} s, of which steps {parts['steps']:.1f} s", flush=True)
    # what a search does instead before its first trial (`FineTuneFitness.prefit`): the first two plans' widths
    # quantized and their starts fitted together, in one calibration forward (a fitness of its own: nothing cached)
    ahead = FineTuneFitness(loaded.model, loaded.tokenizer, data=data, config=config)
    seconds = defaultdict(float)
    began = time.perf_counter()
    with timing_parts(seconds):
        fitted = ahead.prefit([plan for _, plan, _ in trials[:2]])
    prefit = {"plans": [label for label, *_ in trials[:2]], "fitted": fitted, "seconds": time.perf_counter() - began,
              "parts": dict(seconds)}
    print(f"trial_cost: prefit of {' and '.join(prefit['plans'])}: {prefit['seconds']:.1f} s", flush=True)
    return {"dtype": dtype, "trials": rows, "prefit": prefit, "smoke": smoke}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model and data: checks the script runs")
    parser.add_argument("--work", default=None, help="where the trials' kept runs (and a smoke's model and results) go "
                                                     "(default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="qradaptor-trial-cost-"))
    model = data = None
    if args.smoke:
        from benchmarks.search import smoke_model

        model, data = smoke_model(work)
    payload = {**measure(model, data, smoke=args.smoke, work=work), "environment": environment()}
    md = report(payload)
    write_results("trial_cost-smoke" if args.smoke else "trial_cost", payload, md,
                  directory=work if args.smoke else RESULTS)  # smoke results measure nothing: they stay out of results/
    print(md)
    return 0


COLUMNS = ("build: quantize", "build: adapters", "start: fit", "fit: SVD", "fit: Cholesky and solve",
           "fit: quantization error", "start: apply", "steps", "evaluate", "save")


def report(p: dict) -> str:
    rows = [[t["trial"], t["plan"], f"{t['steps']} / {t['eval_blocks']}", f"{t['seconds']:.1f}",
             *(f"{t['parts'].get(c, 0.0):.1f}" for c in COLUMNS), f"{t['beyond_steps']:.1f}"] for t in p["trials"]]
    first, plain = p["trials"][0], p["trials"][2]
    once = first["beyond_steps"] - plain["beyond_steps"]
    title = " (smoke: a tiny random model)" if p["smoke"] else " (SmolLM2-135M-Instruct, the default data)"
    return (f"# Where a search trial's seconds go{title}\n\n"
            f"The default search's fitness in {p['dtype']}; each part timed around the library call that does it "
            "(`fit:` columns are within `start: fit`; `steps` is training less its evaluations and saves). Steps / "
            "blocks: the fine-tune steps the trial spent and the validation blocks it is judged on.\n\n"
            + markdown_table(["trial", "plan", "steps / blocks", "s", *COLUMNS, "beyond steps"], rows)
            + f"\nA bit-width's first plan pays {once:.1f} s more beyond its steps than a plan of widths already "
              f"seen ({first['trial']}: {first['beyond_steps']:.1f} s, {plain['trial']}: "
              f"{plain['beyond_steps']:.1f} s): quantizing its linears and fitting their starts, once per search. "
              f"Steps ran at {plain['seconds_per_step']:.2f} s each in the mixed plan's trial.\n\n"
            + prefit_report(p)
            + f"CPU: {describe_cpu(p['environment'])}.\n")


def prefit_report(p: dict) -> str:
    """The search's up-front fit of its first plans (one calibration forward for every width) against the same
    widths fitted trial by trial."""
    ahead = p.get("prefit")
    if not ahead:  # results from before the search fitted ahead
        return ""
    first = [t for t in p["trials"] if t["trial"] in ahead["plans"]]
    plain = p["trials"][2]
    # one by one, a width's first plan quantizes its linears while it is built and fits their starts: what it pays
    # beyond a plan of widths already seen, building included
    one_by_one = sum(t["beyond_steps"] - plain["beyond_steps"] for t in first)
    return (f"A search fits its first plans' starts before its first trial instead (`FineTuneFitness.prefit`, every "
            f"width in one calibration forward, the same fits): {' and '.join(ahead['plans'])} together took "
            f"{ahead['seconds']:.1f} s ({ahead['parts'].get('quantize', 0.0):.1f} s of it quantizing, "
            f"{ahead['parts'].get('fit: SVD', 0.0):.1f} s SVDs, {ahead['fitted']} linears), against {one_by_one:.1f} s "
            f"one trial at a time (each one's seconds beyond its steps, less the mixed plan's): "
            f"{one_by_one - ahead['seconds']:.1f} s saved.\n\n")


if __name__ == "__main__":
    sys.exit(main())
