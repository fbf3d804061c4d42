"""The demo: ``qradaptor run`` on the embedded default (SmolLM2-135M-Instruct + CPython's pydoc topics) at a
4-bit budget with small settings, plus uniform 4-bit QLoRA trained for the same number of steps, compared in
one table. Small settings: a short profile, a handful of search trials with very short fine-tunes (the first
steps of the final fine-tune's schedule, which the found plan's fine-tune then continues), a short final
fine-tune; it shows the whole pipeline in about seven minutes on a 2-core CPU, not what a full search finds.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_write_json

log = logging.getLogger("qradaptor")

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


def run_demo(*, out: str | Path = "runs/demo", steps: int = 20, eval_blocks: int = 16, seed: int = 0,
             progress: bool = True) -> DemoResult:
    """Run the pipeline on the default model at a 4-bit budget and train uniform 4-bit alongside."""
    from ..backends import get_backend
    from ..export import open_run
    from ..memory import ModelShapes, predict
    from ..models import LoadedModel, load_base, load_config
    from .run import held_out_metrics, read_metrics, run
    from ..plan import Plan
    from ..rundir import read_run
    from .train import train_plan

    start = time.perf_counter()
    out = Path(out)
    train_settings = {"eval_blocks": 8, "seed": seed}
    baseline_metrics = out / "baseline-metrics.json"
    loaded = load_base(None)
    # The run uses its model up (its fine-tune quantizes it in place): the baseline, when it still has to be
    # trained or measured, gets a copy made here instead of a second load.
    spare = None
    if read_metrics(baseline_metrics) is None:
        # in the baseline's training dtype (bfloat16, the default) at once: half the memory of a float32 copy
        spare = load_base(LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.spec), dtype=torch.bfloat16)
    metrics = run(loaded, budget="4bit", out=out, trials=6, steps=steps, profile_tokens=1024, eval_blocks=eval_blocks,
                  search_settings={**DEMO_SEARCH, "seed": seed}, train_settings=train_settings, progress=progress)

    shapes = ModelShapes.from_config(load_config(None))
    # priced in the dtype the runs trained in (scales and zeros are stored in it)
    backend = get_backend("hqq", compute_dtype=getattr(torch, read_run(out / "train")["config"]["dtype"]))
    found = Plan.load(out / "search" / "plan.json")
    uniform = Plan.uniform(shapes.num_layers, 4, 16)
    baseline_dir = out / "baseline-uniform4"
    base = read_metrics(baseline_metrics)
    if base is None:
        status = (read_run(baseline_dir) or {}).get("status")
        if status == "finished":
            tuned = open_run(baseline_dir, spare)
            model, tokenizer = tuned.model, tuned.tokenizer
        else:
            uniform.save(out / "uniform4-plan.json")
            log.info("demo: uniform 4-bit baseline, same steps")
            model = train_plan(baseline_dir, plan=out / "uniform4-plan.json", model=spare,
                               steps=None if status else steps, resume=bool(status), progress=progress,
                               **({} if status else train_settings)).model
            tokenizer = spare.tokenizer
        # measured as `run` measures the found plan: test loss trained, and adapters off
        base = held_out_metrics(model, tokenizer, data=None, seq_len=256, max_blocks=eval_blocks, progress=progress)
        atomic_write_json(baseline_metrics, base)

    rows = []
    for name, plan, m in (("found plan", found, metrics), ("uniform 4-bit", uniform, base)):
        report = predict(shapes, plan, backend)
        rows.append(DemoRow(name, plan.describe(), report.total_bytes, report.avg_bits, m["test_loss_before"],
                            m["test_loss_after"]))
    # the found plan's fine-tune continued the search's run of it from this step (0: from scratch)
    continued = (read_run(out / "train").get("initialised_from") or {}).get("step", 0)
    settings = {"steps": steps, "eval_blocks": eval_blocks, "search": DEMO_SEARCH, "trials": 6,
                "continued_from_step": continued, "seconds": round(time.perf_counter() - start, 1), "out": str(out)}
    atomic_write_json(out / "demo.json", {"rows": [r.__dict__ for r in rows], "settings": settings})
    return DemoResult(rows, settings)
