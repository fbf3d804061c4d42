"""The demo: ``qradaptor run`` on the embedded default (SmolLM2-135M-Instruct + CPython's pydoc topics) at a
budget where the frontier benchmark shows the search beating every uniform setting that fits, with small
settings; plus the best uniform setting in that budget trained for the same steps, compared in one table. Small
settings: a short profile, a handful of search trials with very short fine-tunes (the first steps of the final
fine-tune's schedule, which both final fine-tunes then continue), a short final fine-tune; it shows the whole
pipeline in a few minutes on a 2-core CPU, not what a full search finds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..io import atomic_write_json
from ..plan import Plan

log = logging.getLogger("qradaptor")

#: The demo's budget and small settings. At this budget the frontier benchmark's search beats the best uniform
#: setting that fits (benchmarks/results/frontier.md).
DEMO_BUDGET = "3.5bit"
DEMO_TRIALS = 6
# Quality only, within the budget (as the frontier benchmark searches): at the default 0.5 the search trades loss
# for memory below the budget, and the demo compares at the budget.
DEMO_ALPHA = 1.0
DEMO_PROFILE_TOKENS = 512
DEMO_SEQ_LEN = 128  # as the frontier benchmark trains (batches of 4×128 tokens)
DEMO_SEARCH = {"population": 4, "promote": 1, "refine": 1, "warm_start": 2,
               "cheap": {"name": "cheap", "steps": 3, "eval_blocks": 4},
               "full": {"name": "full", "steps": 10, "eval_blocks": 8}}


@dataclass
class DemoRow:
    name: str
    plan: str
    memory_bytes: int
    avg_bits: float
    loss_before: float
    loss_after: float


@dataclass
class DemoResult:
    rows: list[DemoRow]
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'plan':<14} {'memory (MiB)':>12} {'avg bits':>9} {'loss before':>12} {'loss after':>11}  layout"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<14} {r.memory_bytes / 2**20:>12.2f} {r.avg_bits:>9.2f} {r.loss_before:>12.4f} "
                         f"{r.loss_after:>11.4f}  {r.plan}")
        return "\n".join(lines)


def best_uniform(search_dir: Path) -> tuple[str, Plan]:
    """The uniform setting a user would pick in the search's budget: of those the search measured at its full
    fidelity (the two largest bit-widths that fit, each with the largest rank that fits), the one with the lower
    loss there. Its source name (``uniform-4bit-r16``) and plan."""
    info = json.loads((search_dir / "pareto.json").read_text(encoding="utf-8"))
    uniform = [p for p in info["points"] if p["source"].startswith("uniform-") and p["fidelity"] == "full"]
    if not uniform:
        raise ArtifactError(f"the search in {search_dir} measured no uniform setting at its full fidelity",
                            "give the demo a budget that fits uniform 3-bit weights with rank-4 adapters or more")
    best = min(uniform, key=lambda p: p["loss"])
    return best["source"], Plan.from_dict(best["plan"])


def run_demo(*, out: str | Path = "runs/demo", budget: str = DEMO_BUDGET, steps: int = 20, eval_blocks: int = 32,
             seed: int = 0, progress: bool = True) -> DemoResult:
    """Run the pipeline on the default model at ``budget`` and train the best uniform setting that fits alongside."""
    from ..backends import get_backend
    from ..export import open_run
    from ..memory import ModelShapes, predict
    from ..models import load_base, load_config
    from ..rundir import read_run
    from ..search import kept_run, plan_key
    from .run import held_out_metrics, read_metrics, run
    from .train import KeptRunMismatch, train_plan

    start = time.perf_counter()
    out = Path(out)
    train_settings = {"eval_blocks": 8, "seed": seed}
    metrics = run(None, budget=budget, out=out, alpha=DEMO_ALPHA, trials=DEMO_TRIALS, steps=steps,
                  profile_tokens=DEMO_PROFILE_TOKENS, seq_len=DEMO_SEQ_LEN, eval_blocks=eval_blocks,
                  search_settings={**DEMO_SEARCH, "seed": seed}, train_settings=train_settings, progress=progress)

    shapes = ModelShapes.from_config(load_config(None))
    dtype = getattr(torch, read_run(out / "train")["config"]["dtype"])
    backend = get_backend("hqq", compute_dtype=dtype)  # priced in the dtype the runs trained in (scales, zeros)
    found = Plan.load(out / "search" / "plan.json")
    source, uniform = best_uniform(out / "search")
    baseline_dir, baseline_metrics = out / f"baseline-{source}", out / f"baseline-{source}-metrics.json"
    base = metrics if plan_key(uniform) == plan_key(found) else read_metrics(baseline_metrics)
    if base is None:
        # the run used its model up (its fine-tune quantized it in place): the baseline loads its own
        spare = load_base(None, dtype=dtype)
        status = (read_run(baseline_dir) or {}).get("status")
        if status == "finished":
            model = open_run(baseline_dir, spare).model
        else:
            uniform.save(out / f"{source}-plan.json")
            log.info("demo: the best uniform setting, %s, for the same steps", source)
            # it continues the search's run of this setting, as the found plan's fine-tune continues its own
            kept = None if status else kept_run(out / "search", uniform=source)
            common = dict(plan=out / f"{source}-plan.json", model=spare, progress=progress)
            fresh = {"steps": steps, "seq_len": DEMO_SEQ_LEN, **train_settings}  # a resumed run keeps its own
            try:
                model = train_plan(baseline_dir, resume=bool(status), init_from=kept[0] if kept else None, **common,
                                   **({} if status else fresh)).model
            except KeptRunMismatch as e:  # refused before anything was written: train from step 0
                log.warning("demo: not continuing the search's run of %s (%s); training from step 0", source, e.cause)
                model = train_plan(baseline_dir, **common, **fresh).model
        # measured as `run` measures the found plan: test loss trained, and adapters off
        base = held_out_metrics(model, spare.tokenizer, data=None, seq_len=DEMO_SEQ_LEN, max_blocks=eval_blocks,
                                progress=progress)
        atomic_write_json(baseline_metrics, base)

    rows = []
    for name, plan, m in (("found plan", found, metrics), (_label(source), uniform, base)):
        report = predict(shapes, plan, backend)
        rows.append(DemoRow(name, plan.describe(), report.total_bytes, report.avg_bits, m["test_loss_before"],
                            m["test_loss_after"]))
    # the step each fine-tune continued the search's run of its plan from (0: from scratch)
    continued, continued_baseline = (((read_run(d) or {}).get("initialised_from") or {}).get("step", 0)
                                     for d in (out / "train", baseline_dir))
    settings = {"budget": budget, "steps": steps, "seq_len": DEMO_SEQ_LEN, "eval_blocks": eval_blocks,
                "search": DEMO_SEARCH, "trials": DEMO_TRIALS, "alpha": DEMO_ALPHA,
                "profile_tokens": DEMO_PROFILE_TOKENS, "baseline": source,
                "continued_from_step": continued, "baseline_continued_from_step": continued_baseline,
                "seconds": round(time.perf_counter() - start, 1), "out": str(out)}
    atomic_write_json(out / "demo.json", {"rows": [r.__dict__ for r in rows], "settings": settings})
    return DemoResult(rows, settings)


def _label(source: str) -> str:
    """``uniform-4bit-r16`` → ``uniform 4b r16``: the table's name for a uniform setting."""
    bits, rank = source.removeprefix("uniform-").split("-")
    return f"uniform {bits.removesuffix('bit')}b {rank}"
