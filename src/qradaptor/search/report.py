"""A search's results: evaluated points, the Pareto front, and the files written to --out."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import QuantBackend
from ..io import atomic_write_json, atomic_write_text
from ..memory import ModelShapes, format_bytes
from ..plan import DEFAULT_RANK, UNQUANTIZED_BITS, LayerChoice, Plan
from .config import FORMAT, SearchConfig
from .genes import plan_key
from .planner import Planner

log = logging.getLogger("qradaptor")


@dataclass
class Evaluated:
    plan: Plan
    memory_bytes: int
    avg_bits: float
    loss: float
    fidelity: str
    source: str
    trial: int | None = None

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "memory_bytes": self.memory_bytes, "avg_bits": self.avg_bits,
                "loss": self.loss, "fidelity": self.fidelity, "source": self.source, "trial": self.trial}


@dataclass
class SearchResult:
    chosen: Evaluated
    points: list[Evaluated]
    budget_bytes: int
    fine_tune_steps: int
    seconds: float
    config: dict
    # the chosen plan's fine-tune as the search left it (`FineTuneFitness(runs=...)`), and its step: the final
    # fine-tune continues it (``qradaptor train --init-from``), so those steps are not spent twice
    kept_run: str | None = None
    kept_step: int = 0
    # the same for the uniform settings the search measured at the full fidelity (their source → run, step)
    uniform_runs: dict[str, tuple[str, int]] = field(default_factory=dict)

    def front(self, fidelity: str) -> list[Evaluated]:
        return pareto_front([p for p in self.points if p.fidelity == fidelity])


def measured_uniform(points: list[Evaluated]) -> list[Evaluated]:
    """The uniform settings measured at the full fidelity: the baselines the search's choice is compared with."""
    return [p for p in points if p.fidelity == "full" and p.source.startswith("uniform-")]


def bit_widths_tried(plans: list[Plan]) -> dict[int, int]:
    """Bit-width → how many decoder layers some of ``plans`` store (in one linear or more) at it. A search quantizes
    each (linear, bit-width) once and fits its adapter start once (one calibration forward for the linears a plan
    adds): seconds beyond its fine-tune steps that grow with the widths it meets (benchmarks/results/trial_cost.md)."""
    layers: dict[int, set[int]] = {}
    for plan in plans:
        for index, choice in enumerate(plan.layers):
            for bits in choice.bit_widths:
                layers.setdefault(bits, set()).add(index)
    return {bits: len(found) for bits, found in sorted(layers.items())}


def describe_bit_widths(tried: dict[int, int], layers: int) -> str:
    """`bit_widths_tried`'s result in words: ``3-bit in 2 of 30 layers, 4-bit in 30 of 30 layers``."""
    return ", ".join(f"{bits}-bit{' (unquantized)' if int(bits) == UNQUANTIZED_BITS else ''} in {n} of {layers} layers"
                     for bits, n in tried.items())


def pareto_front(points: list[Evaluated]) -> list[Evaluated]:
    """Non-dominated points in (loss, memory), sorted by memory."""
    front = []
    for p in sorted(points, key=lambda p: (p.memory_bytes, p.loss)):
        if not front or p.loss < front[-1].loss:
            front.append(p)
    return front


def write_outputs(result: SearchResult, out: Path, shapes: ModelShapes, backend: QuantBackend) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cheap, full = result.front("cheap"), result.front("full")
    on_front = {(plan_key(p.plan), p.fidelity) for p in cheap + full}
    atomic_write_json(out / "pareto.json", {
        "format": FORMAT,
        "budget_bytes": result.budget_bytes,
        "chosen": result.chosen.to_dict(),
        "points": [{**p.to_dict(), "on_front": (plan_key(p.plan), p.fidelity) in on_front} for p in result.points],
        "fine_tune_steps": result.fine_tune_steps,
        # the chosen plan's kept run (relative to this directory) and its step: `train --init-from` continues it
        "kept_run": _relative(result.kept_run, out), "kept_step": result.kept_step,
        "uniform_runs": {source: {"kept_run": _relative(path, out), "kept_step": step}
                         for source, (path, step) in result.uniform_runs.items()},
        "seconds": result.seconds,
        "settings": {k: v for k, v in result.config.items() if k != "sensitivity"},
    })
    result.chosen.plan.save(out / "plan.json")
    atomic_write_text(out / "search-summary.txt", summary(result))
    try:
        plot_pareto(result, out / "pareto.png", shapes, backend)
    except Exception as e:  # never lose the search over a plot
        log.warning("search: could not draw pareto.png (%s)", e)


def _relative(path: str | None, out: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:  # kept elsewhere
        return str(Path(path).resolve())


def kept_run(search_dir: str | Path, uniform: str | None = None) -> tuple[Path, int] | None:
    """The chosen plan's kept run that a search in ``search_dir`` recorded in pareto.json, and its step (with
    ``uniform``, a point's source such as ``uniform-4bit-r16``: that uniform setting's run); None when it kept none
    (or it is gone)."""
    import json

    search_dir = Path(search_dir)
    try:
        info = json.loads((search_dir / "pareto.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if uniform is not None:
        info = (info.get("uniform_runs") or {}).get(uniform)
        if not isinstance(info, dict):
            return None
    path, step = info.get("kept_run"), info.get("kept_step")
    if not isinstance(path, str) or not path or not isinstance(step, int) or step < 1:
        return None
    path = search_dir / path
    return (path, step) if path.is_dir() else None


#: How a summary names what the budget bounds (nothing for the stored model).
BUDGET_ON = {"training": " on the predicted training peak", "gguf": " on the GGUF files (model.gguf + adapter.gguf)"}


def summary(result: SearchResult) -> str:
    c = result.chosen
    on = BUDGET_ON.get(result.config.get("budget_on"), "")
    lines = [
        f"budget {format_bytes(result.budget_bytes)}{on}; {len(result.points)} evaluations "
        f"({sum(p.fidelity == 'cheap' for p in result.points)} cheap, {sum(p.fidelity == 'full' for p in result.points)} full), "
        f"{result.fine_tune_steps} fine-tune steps, {result.seconds:.0f} s",
        f"chosen plan: {c.plan.describe()}",
        f"  memory {format_bytes(c.memory_bytes)} ({c.avg_bits:.2f} avg bits incl. scales/zeros, adapters counted), "
        f"held-out loss {c.loss:.4f} ({c.fidelity} fidelity, from {c.source})",
    ]
    if result.kept_run:
        from ..rundir import RunConfig

        lr = (result.config.get("full") or {}).get("lr", RunConfig.lr)  # a fine-tune at the rate it ran at
        rate = "" if lr == RunConfig.lr else f"--lr {lr:g} "
        lines.append(f"  its fine-tune is kept at step {result.kept_step} in {result.kept_run}: "
                     f"`qradaptor train {rate}--init-from {result.kept_run}` continues it instead of starting over")
    for p in measured_uniform(result.points):
        kept = result.uniform_runs.get(p.source)
        lines.append(f"  {p.source} at full fidelity: loss {p.loss:.4f}, memory {format_bytes(p.memory_bytes)}"
                     + (f"; its run is kept at step {kept[1]} in {kept[0]}" if kept else ""))
    tried, layers = bit_widths_tried([p.plan for p in result.points]), len(c.plan.layers)
    fitted = ", and its adapter start fitted," if result.config.get("adapter_init", "zero") != "zero" else ""
    lines.append(f"bit-widths its plans stored (each linear quantized{fitted} once per width): "
                 f"{describe_bit_widths(tried, layers)}")
    return "\n".join(lines) + "\n"


def plot_pareto(result: SearchResult, path: Path, shapes: ModelShapes, backend: QuantBackend) -> Path:
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    mib = 2**20
    for fidelity, colour in (("cheap", "#9ecae1"), ("full", "#08519c")):
        pts = [p for p in result.points if p.fidelity == fidelity]
        if pts:
            ax.scatter([p.memory_bytes / mib for p in pts], [p.loss for p in pts], s=18, color=colour,
                       label=f"{fidelity} fidelity ({len(pts)})")
            front = pareto_front(pts)
            ax.step([p.memory_bytes / mib for p in front], [p.loss for p in front], where="post", color=colour, lw=1)
    ax.axvline(result.budget_bytes / mib, color="crimson", ls="--", lw=1, label="budget")
    # the uniform settings at the default rank, priced as the search priced its plans (the same kind of budget)
    config = SearchConfig.from_dict({k: v for k, v in result.config.items() if k in SearchConfig.__dataclass_fields__})
    planner = Planner(shapes, backend, None, config)
    for b in backend.supported_bits:
        if b in config.bits:
            m = planner.memory(planner.plan([LayerChoice(b, DEFAULT_RANK)] * shapes.num_layers))
            ax.axvline(m / mib, color="grey", ls=":", lw=0.8)
            ax.text(m / mib, ax.get_ylim()[1], f" {b}-bit", fontsize=7, color="grey", va="top")
    ax.scatter([result.chosen.memory_bytes / mib], [result.chosen.loss], marker="*", s=160, color="orange",
               zorder=5, label="chosen")
    ax.set_xlabel({"training": "predicted training peak (MiB)", "gguf": "model.gguf + adapter.gguf (MiB)"}.get(
        config.budget_on, "memory of quantized weights + adapters + rest (MiB)"))
    ax.set_ylabel("held-out loss after fine-tune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path
