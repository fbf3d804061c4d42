"""Quality-vs-memory frontier: qradaptor's plans against uniform QLoRA-style quantization, 16-bit LoRA and
simpler allocators, on SmolLM2-135M-Instruct with the default data, every method fine-tuned with the same
data, steps, seed and evaluation.

    lora16            LoRA r=16 on the bf16 base (unquantized): the quality ceiling
    uniform4          uniform 4-bit HQQ + LoRA r=16 (QLoRA-style; the memory reference), seeds 0, 1, 2
    uniform3          uniform 3-bit HQQ + LoRA r=16
    greedy            bits and ranks from the sensitivity profile alone (greedy fill), 4-bit budget, no search
    random            random search (plans repaired into the 4-bit budget), as many fine-tune steps as ours
    qradaptor-<B>     the pipeline's search at budgets 3bit, 3.5bit, 4bit, 5bit
    qradaptor-4bit-r16  ablation: the same search over bits only, every adapter at rank 16

Per method: weight memory (measured, adapters included), average bits, trainable parameters, KL to the
full model before training (test split), held-out test loss and perplexity after training, search cost
(fine-tune steps, seconds), the final fine-tune's seconds (it runs through `qradaptor.train` in its own
process) and peak RSS during training (a separate fresh process trains the plan for a few steps with the same
batch shape and reads its own high-water mark, reset after the model is built).

    .venv/bin/python benchmarks/frontier.py            # SmolLM2: about 1.5 h on 2 cores
    .venv/bin/python benchmarks/frontier.py --smoke    # a tiny random model, a minute: keeps this script working

Everything is resumable: results per method go to ``--work`` (default benchmarks/work/frontier); rerunning
skips what is done. Writes benchmarks/results/frontier.{json,md,png}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, environment, markdown_table, write_results  # noqa: E402

BUDGETS = ("3bit", "3.5bit", "4bit", "5bit")
FULL = {  # SmolLM2 settings, chosen so the whole benchmark fits in about 1.5 h on 2 cores
    "steps": 100, "seq_len": 128, "batch_size": 4, "lr": 3e-4, "seeds": 3, "kl_blocks": 16, "profile_tokens": 4096,
    "rss_steps": 5,
    "search": {"trials": 12, "population": 6, "promote": 1, "refine": 2, "warm_start": 4, "alpha": 1.0,
               "cheap": {"name": "cheap", "steps": 4, "eval_blocks": 8},
               "full": {"name": "full", "steps": 12, "eval_blocks": 16}},
}
SMOKE = {
    "steps": 4, "seq_len": 32, "batch_size": 4, "lr": 3e-4, "seeds": 2, "kl_blocks": 4, "profile_tokens": 256,
    "rss_steps": 2,
    "search": {"trials": 4, "population": 2, "promote": 1, "refine": 1, "warm_start": 2, "alpha": 1.0,
               "cheap": {"name": "cheap", "steps": 1, "eval_blocks": 2},
               "full": {"name": "full", "steps": 2, "eval_blocks": 2}},
}


# ---------------------------------------------------------------------------------------- the final fine-tune


def final_run(spec_path: str) -> None:
    """Child process: the real ``qradaptor train`` stage on one plan, then the test-split loss of the trained
    model. Writes ``final.json`` next to the run."""
    from qradaptor.data import load_blocks
    from qradaptor.evaluate import evaluate_loss
    from qradaptor.io import atomic_write_json
    from qradaptor.models import load_model
    from qradaptor.commands import train_plan

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    if run_dir.exists():  # an interrupted earlier attempt: start over so its seconds are whole
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    result = train_plan(run_dir, plan=spec["plan"], model=spec["model"], data=spec["data"], steps=spec["steps"],
                        seq_len=spec["seq_len"], batch_size=spec["batch_size"], lr=spec["lr"], seed=spec["seed"],
                        dtype=spec["dtype"], eval_every=0, eval_blocks=16, checkpoint_every=spec["steps"],
                        progress=False)
    seconds = time.perf_counter() - start
    _, tokenizer = load_model(spec["model"])
    test = load_blocks(spec["data"], tokenizer, "test", seq_len=spec["seq_len"])
    evaluated = evaluate_loss(result.model, test, progress=False)
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    atomic_write_json(Path(spec["result"]), {
        "loss": evaluated.loss, "perplexity": evaluated.perplexity, "test_tokens": evaluated.tokens,
        "train_seconds": seconds, "train_loop_seconds": result.train.seconds, "trainable_params": trainable,
        "memory_bytes": result.metrics["memory"]["measured_bytes"],
        "predicted_bytes": result.metrics["memory"]["predicted_bytes"], "avg_bits": result.metrics["memory"]["avg_bits"],
        "final_train_loss": result.train.final_loss, "validation_loss": (result.validation or {}).get("loss")})


def run_final(work: Path, name: str, plan, settings: dict, model, data, *, seed: int, dtype: str = "float32") -> dict:
    """Train ``plan`` in a child process (the real training stage), or return a finished earlier run's result."""
    from qradaptor.io import atomic_write_json

    result_path, spec_path = work / name / "final.json", work / name / "spec.json"
    spec = {"run_dir": str(work / name / "train"), "result": str(result_path), "plan": plan.to_dict(),
            "model": model, "data": data, "steps": settings["steps"], "seq_len": settings["seq_len"],
            "batch_size": settings["batch_size"], "lr": settings["lr"], "seed": seed, "dtype": dtype}
    _drop_if_stale(result_path, spec_path, spec)
    if not result_path.is_file():
        (work / name).mkdir(parents=True, exist_ok=True)
        spec_path = atomic_write_json(spec_path, spec)
        print(f"frontier: {name}: final fine-tune ({plan.describe()})", flush=True)
        child(name, "--final-run", spec_path)
    return json.loads(result_path.read_text())


def _drop_if_stale(result_path: Path, spec_path: Path, spec: dict) -> None:
    """Remove a kept result that an earlier run made with other settings (dtype, steps, plan, seed): rerunning the
    benchmark after its settings changed must not report it as this one's."""
    paths = ("run_dir", "result")
    if result_path.is_file() and spec_path.is_file():
        kept = json.loads(spec_path.read_text())
        if {k: v for k, v in kept.items() if k not in paths} != {k: v for k, v in spec.items() if k not in paths}:
            result_path.unlink()


def child(name: str, mode: str, spec_path: Path) -> None:
    code = subprocess.call([sys.executable, str(Path(__file__).resolve()), mode, str(spec_path)])
    if code != 0:
        sys.exit(f"frontier: {mode[2:]} of {name} failed (exit {code}); rerun to retry it")


# ---------------------------------------------------------------------------------------- peak RSS


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_run(spec_path: str) -> None:
    """Child process: peak RSS while training ``plan`` with the final fine-tune's batch shape. The process's
    own high-water mark is reset (``/proc/self/clear_refs``) once the quantized model with adapters is built,
    so loading and quantizing do not count; the steps after the first allocate nothing new (AdamW state
    exists from step 1), so a few steps reach the whole run's peak."""
    import gc

    import torch

    from qradaptor.data import load_blocks
    from qradaptor.io import atomic_write_json
    from qradaptor.models import load_model
    from qradaptor.plan import Plan
    from qradaptor.quantize import prepare_model
    from qradaptor.train import TrainConfig, train

    spec = json.loads(Path(spec_path).read_text())
    dtype = getattr(torch, spec["dtype"])
    base, tokenizer = load_model(spec["model"], dtype=dtype)
    blocks = load_blocks(spec["data"], tokenizer, "train", seq_len=spec["seq_len"])
    model = prepare_model(base, Plan.from_dict(spec["plan"]), dtype=dtype, seed=spec["seed"])
    del base
    gc.collect()
    before = _vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    train(model, blocks, TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"],
                                     seed=spec["seed"]), progress=False)
    atomic_write_json(Path(spec["result"]), {"peak_rss_bytes": _vm_kib("VmHWM") * 1024,
                                             "rss_before_training_bytes": before * 1024, "steps": spec["steps"]})


def measure_rss(work: Path, name: str, plan, settings: dict, model, data, *, dtype: str) -> dict:
    """Peak RSS of ``plan``'s training in a fresh process (or the earlier measurement)."""
    from qradaptor.io import atomic_write_json

    result_path, spec_path = work / name / "rss.json", work / name / "rss-spec.json"
    spec = {"result": str(result_path), "plan": plan.to_dict(), "model": model, "data": data,
            "steps": settings["rss_steps"], "seq_len": settings["seq_len"], "batch_size": settings["batch_size"],
            "lr": settings["lr"], "seed": 0, "dtype": dtype}
    _drop_if_stale(result_path, spec_path, spec)
    if not result_path.is_file():
        child(name, "--rss-run", atomic_write_json(spec_path, spec))
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------------------- shared set-up


class Bench:
    """The model, the one sensitivity profile and the one fitness (with its quantization cache) that every
    search of a benchmark run shares; also used by benchmarks/search.py, which reuses the same work dir."""

    def __init__(self, work: str | None, *, smoke: bool):
        from qradaptor.backends import get_backend
        from qradaptor.memory import ModelShapes
        from qradaptor.models import load_model
        from qradaptor.profile import RESULT_FILE, ProfileSettings, Sensitivity, profile_model
        from qradaptor.search import FineTuneFitness, SearchConfig

        self.smoke, self.settings = smoke, dict(SMOKE if smoke else FULL)
        self.work = Path(work or (tempfile.mkdtemp(prefix="qradaptor-bench-") if smoke
                                  else Path(__file__).resolve().parent / "work" / "frontier"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = self.data = None
        if smoke:
            from benchmarks.search import smoke_model

            self.model, self.data = smoke_model(self.work)
        self.base, self.tokenizer = load_model(self.model)
        self.shapes = ModelShapes.from_model(self.base)
        self.backend = get_backend("hqq")

        # Stage 1, once: the sensitivity profile every search and the greedy allocator use.
        self.profile_path = self.work / "profile" / RESULT_FILE
        seconds = self.work / "profile" / "seconds.txt"
        if not self.profile_path.is_file():
            t = time.perf_counter()
            profile_model(self.base, self.tokenizer,
                          ProfileSettings(tokens=self.settings["profile_tokens"], seq_len=self.settings["seq_len"],
                                          dtype="bfloat16", data=self.data),
                          out=self.profile_path.parent, force=True, progress=not smoke)
            seconds.write_text(f"{time.perf_counter() - t:.1f}\n")
        self.sensitivity = Sensitivity.load(self.profile_path)
        self.profile_seconds = float(seconds.read_text())

        self.search_settings = dict(self.settings["search"])
        self.trials, self.alpha = self.search_settings.pop("trials"), self.search_settings.pop("alpha")
        self.fitness = FineTuneFitness(self.base, self.tokenizer, data=self.data,
                                       config=SearchConfig(budget_bytes=1, seq_len=self.settings["seq_len"], seed=0))

    def search(self, name: str, budget: str, **extra):
        """Run (or resume, or reload when finished) the search ``name`` in ``work/name/search``."""
        from qradaptor.commands import search

        return search(self.model, data=self.data, budget=budget, out=self.work / name / "search", alpha=self.alpha,
                      sensitivity=str(self.profile_path), progress=not self.smoke, fitness=self.fitness,
                      **{"trials": self.trials, "seq_len": self.settings["seq_len"], "seed": 0,
                         **self.search_settings, **extra})

    def search_cost(self, name: str, result) -> dict:
        """Fine-tune steps and seconds of a search, from its storage (a resumed search counts every session)."""
        import optuna

        seconds = 0.0
        for study in ("qradaptor", "qradaptor:refine"):
            loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{self.work / name / 'search' / 'study.db'}")
            seconds += sum((t.datetime_complete - t.datetime_start).total_seconds() for t in loaded.trials
                           if t.datetime_complete and t.datetime_start)
        return {"search_steps": result.fine_tune_steps, "search_seconds": seconds,
                "search_evaluations": len(result.points)}

    def random_settings(self, steps: int) -> dict:
        """Random search settings that spend about ``steps`` fine-tune steps (cheap trials, then promotion)."""
        cheap, full = self.search_settings["cheap"]["steps"], self.search_settings["full"]["steps"]
        trials = max(1, round((steps - self.search_settings["promote"] * full) / cheap))
        return {"trials": trials, "refine": 0, "sampler": "random"}


# ---------------------------------------------------------------------------------------- before training


def kl_to_full(base, plan, blocks, cache, dtype) -> float:
    """Mean per-token KL(full ‖ quantized) on ``blocks`` before any training (adapters start at zero)."""
    import torch

    from qradaptor.quantize import quantize_model

    quantized = quantize_model(base, plan, cache=cache, dtype=dtype)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), 4):
            ids = blocks.input_ids[i : i + 4]
            p = torch.log_softmax(base(input_ids=ids).logits.float(), -1)
            q = torch.log_softmax(quantized(input_ids=ids).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum())
            tokens += ids.numel()
    return total / tokens


# ---------------------------------------------------------------------------------------- the report


def front(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (memory, loss), by memory."""
    out = [r for r in rows if not any(o is not r and o["memory_bytes"] <= r["memory_bytes"] and o["loss"] <= r["loss"]
                                      and (o["memory_bytes"], o["loss"]) != (r["memory_bytes"], r["loss"]) for o in rows)]
    return sorted(out, key=lambda r: r["memory_bytes"])


def targets(methods: list[dict], final_steps: int) -> dict:
    by = {m["name"]: m for m in methods}
    u4, ceiling = by["uniform4"], by["lora16"]
    gap = u4["loss"] - ceiling["loss"]
    at_4bit = [m for m in methods if m["name"].startswith("qradaptor") and m["memory_bytes"] <= u4["memory_bytes"]]
    best4 = min(at_4bit, key=lambda m: m["loss"]) if at_4bit else None
    out = {
        "uniform4_loss_mean": u4["loss"], "uniform4_loss_spread": u4.get("loss_spread"),
        "gap_uniform4_minus_lora16": gap,
        "best_at_uniform4_memory": best4 and best4["name"],
        "best_at_uniform4_memory_loss_delta": best4 and best4["loss"] - u4["loss"],
        "gap_recovered": best4 and (u4["loss"] - best4["loss"]) / gap if gap > 0 else None,
        "no_worse_than_uniform4_at_its_memory": bool(best4 and best4["loss"] <= u4["loss"]),
        # better by more than the uniform-4 seeds' max-min spread: a difference that seed noise does not explain
        "better_than_uniform4_beyond_seed_spread": bool(best4 and u4["loss"] - best4["loss"] > (u4.get("loss_spread") or 0)),
        "gap_recovered_at_least_90pct": bool(best4 and gap > 0 and (u4["loss"] - best4["loss"]) / gap >= 0.9),
    }
    # "≤ 3.5 average bits" in the sense: the 3.5-bit budget (our avg_bits also counts scales and zeros,
    # one bit more than the nominal width at group size 64 with fp32 metadata)
    q35 = by.get("qradaptor-3.5bit")
    out["at_3.5bit_loss_delta_vs_uniform4"] = q35 and q35["loss"] - u4["loss"]
    out["at_3.5bit_no_worse_than_uniform4"] = bool(q35 and q35["loss"] <= u4["loss"])
    out["at_3.5bit_code_bits"] = q35 and q35["code_bits"]
    costs = {m["name"]: m["search_steps"] / final_steps for m in methods if m["name"].startswith("qradaptor")}
    out["search_cost_in_final_fine_tunes"] = costs
    out["search_cost_at_most_one_fine_tune"] = all(c <= 1 for c in costs.values())
    return out


STYLE = {  # name: (marker, colour); qradaptor budgets are blue circles
    "lora16": ("*", "black"), "uniform4": ("s", "#d95f02"), "uniform3": ("s", "#e7298a"),
    "greedy": ("^", "#1b9e77"), "random": ("D", "#7570b3"),
}


def plot(methods: list[dict], path: Path) -> None:
    """Held-out loss vs memory, one legend entry per method, and a zoom on the uniform 4-bit neighbourhood
    (where several methods land within a few hundredths of a nat)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, ax = plt.subplots(figsize=(8, 5.2))
    u4 = next(m for m in methods if m["name"] == "uniform4")
    near = [m for m in methods if abs(m["memory_bytes"] - u4["memory_bytes"]) < 0.02 * u4["memory_bytes"]
            and abs(m["loss"] - u4["loss"]) < 0.05]
    inset = ax.inset_axes([0.42, 0.42, 0.3, 0.5]) if len(near) > 1 else None
    shades = itertools.cycle(["#c6dbef", "#6baed6", "#2171b5", "#08306b", "#9e9ac8"])
    for m in methods:
        marker, colour = STYLE.get(m["name"], ("o", None))
        colour = colour or next(shades)
        for axis in (ax, inset) if (inset is not None and m in near) else (ax,):
            axis.errorbar(m["memory_bytes"] / mib, m["loss"], yerr=m.get("loss_spread", 0) / 2 or None, fmt=marker,
                          color=colour, markersize=9 if marker == "*" else 6, capsize=3,
                          label=m["name"] if axis is ax else None)
    f = front(methods)
    ax.plot([m["memory_bytes"] / mib for m in f], [m["loss"] for m in f], "--", color="grey", lw=1, label="front")
    if inset is not None:
        inset.set_title("zoom: uniform 4-bit memory", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
        ax.indicate_inset_zoom(inset, edgecolor="grey")
    ax.set_xlabel("weight memory incl. adapters (MiB, measured)")
    ax.set_ylabel("held-out test loss after fine-tuning")
    ax.set_title("SmolLM2-135M: quality vs memory, same fine-tune for every method", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report(methods: list[dict], settings: dict, goals: dict, smoke: bool) -> str:
    by = {m["name"]: m for m in methods}
    u4, ceiling = by["uniform4"], by["lora16"]
    gap = u4["loss"] - ceiling["loss"]
    rows = []
    for m in methods:
        recovered = (u4["loss"] - m["loss"]) / gap if gap > 0 else float("nan")
        rows.append([m["name"], f"{m['memory_bytes'] / 2**20:.1f}", f"{m['memory_bytes'] / u4['memory_bytes']:.3f}",
                     f"{m['code_bits']:.2f}", f"{m['avg_bits']:.2f}", f"{m['trainable_params'] / 1e6:.2f}M",
                     f"{m['kl_before']:.4f}",
                     f"{m['loss']:.4f}" + (f" ± {m['loss_spread'] / 2:.4f}" if m.get("loss_spread") else ""),
                     f"{m['perplexity']:.2f}", f"{m['loss'] - u4['loss']:+.4f}", f"{100 * recovered:.0f}%",
                     m["search_steps"], f"{m['search_steps'] / settings['steps']:.2f}", f"{m['search_seconds']:.0f}",
                     f"{m['train_seconds']:.0f}", f"{m['peak_rss_bytes'] / 2**20:.0f}",
                     f"{m['rss_before_training_bytes'] / 2**20:.0f}", f"{m['training_estimate_bytes'] / 2**20:.0f}",
                     m["plan"].replace("|", "/")])
    title = "a tiny random model (smoke)" if smoke else "SmolLM2-135M-Instruct"
    md = (f"# Quality vs memory on {title}\n\n"
          f"Every method: {settings['steps']} LoRA steps of {settings['batch_size']}×{settings['seq_len']} tokens "
          f"(lr {settings['lr']}, seed 0) on the default data's training split, held-out loss on the whole test split "
          f"({methods[0]['test_tokens']} tokens). HQQ group size 64; the shipped SmolLM2 weights were already "
          f"4-bit at group size 32 (GGUF Q4_1), dequantized to fp32 before anything here. Quantized runs compute in "
          f"{settings.get('dtype', 'float32')} (the training default), checkpointing on; `lora16` is the bf16 base (weights and compute). Memory is measured on the "
          f"trained model (weights, quantization metadata and LoRA adapters). avg bits counts scales and zeros "
          f"(uniform 4-bit = 5.0); code bits is the plan's mean bit-width. `uniform4` is the mean of {settings['seeds']} seeds (± half the max–min spread). "
          f"Gap recovered = (uniform4 − method) / (uniform4 − lora16). Search cost is fine-tune steps spent by the "
          f"search and its multiple of one final fine-tune ({settings['steps']} steps); the sensitivity profile is "
          f"shared by the searches and `greedy` and took {settings['profile_seconds']:.0f} s. Peak RSS: the process's "
          f"high-water mark during {settings['rss_steps']} training steps of the plan in a fresh process, reset once the "
          f"model is built (so loading and quantizing do not count; steps after the first allocate nothing new); "
          f"RSS before = that process just before training (runtime, model, data); estimate = `qradaptor train`'s "
          f"training-memory estimate (weights, LoRA gradients, AdamW state, activations; no runtime).\n\n")
    md += markdown_table(["method", "MiB", "× uniform4", "code bits", "avg bits", "trainable", "KL before", "test loss", "ppl",
                          "Δ vs uniform4", "gap recovered", "search steps", "× final", "search s", "train s",
                          "peak RSS MiB", "RSS before MiB", "estimate MiB", "plan"], rows)
    g = goals
    yn = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    md += ("\n## Targets\n\n"
           f"- At ≤ uniform 4-bit memory ({g['best_at_uniform4_memory']}): loss {g['best_at_uniform4_memory_loss_delta']:+.4f} "
           f"vs uniform 4-bit (seed spread {g['uniform4_loss_spread']:.4f}) — no worse: "
           f"{yn(g['no_worse_than_uniform4_at_its_memory'])} (better by more than the seed spread: "
           f"{'yes' if g['better_than_uniform4_beyond_seed_spread'] else 'no'}); gap recovered {100 * (g['gap_recovered'] or 0):.0f}% "
           f"(target ≥ 90%): {yn(g['gap_recovered_at_least_90pct'])}.\n"
           f"- 3.5-bit budget (the memory of uniform 3.5 bits with rank-16 adapters; the plan's mean bit-width is "
           f"{g['at_3.5bit_code_bits']:.2f}, bought with smaller adapters): loss "
           f"{g['at_3.5bit_loss_delta_vs_uniform4']:+.4f} vs uniform 4-bit — no worse: "
           f"{yn(g['at_3.5bit_no_worse_than_uniform4'])}.\n"
           f"- Search cost ≤ one final fine-tune: "
           + ", ".join(f"{k} {v:.2f}×" for k, v in g["search_cost_in_final_fine_tunes"].items())
           + f" — {yn(g['search_cost_at_most_one_fine_tune'])}.\n")
    return md


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    parser.add_argument("--work", default=None, help="resumable working directory (default: benchmarks/work/frontier; "
                                                     "with --smoke a temp dir)")
    parser.add_argument("--final-run", default=None, help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--rss-run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.final_run:
        return final_run(args.final_run)
    if args.rss_run:
        return rss_run(args.rss_run)

    from qradaptor.data import load_blocks
    from qradaptor.memory import parse_budget
    from qradaptor.plan import Plan
    from qradaptor.rundir import RunConfig
    from qradaptor.search import Planner, PriorCost, SearchConfig

    settings = dict(SMOKE if args.smoke else FULL)
    start = time.perf_counter()
    bench = Bench(args.work, smoke=args.smoke)
    model, data, base, tokenizer, L = bench.model, bench.data, bench.base, bench.tokenizer, bench.shapes.num_layers
    settings["profile_seconds"] = bench.profile_seconds

    def searched(name: str, budget: str, **extra) -> tuple[Plan, dict]:
        result = bench.search(name, budget, **extra)
        # the search's own full-fidelity losses, to compare its ranking with the final fine-tune's
        uniform4 = [p.loss for p in result.points if p.fidelity == "full" and p.source.startswith("uniform-4")]
        return result.chosen.plan, {**bench.search_cost(name, result), "search_loss": result.chosen.loss,
                                    "search_uniform4_loss": uniform4[0] if uniform4 else None}

    # Every method: its plan and the search that found it (none for the fixed baselines).
    none = {"search_steps": 0, "search_seconds": 0.0, "search_evaluations": 0}
    plans: list[tuple[str, Plan, dict, str]] = [("lora16", Plan.uniform(L, 16, 16), none, "bfloat16")]
    # quantized plans train as `qradaptor train` does by default (its compute dtype, checkpointing on)
    dtype = settings["dtype"] = RunConfig().dtype
    plans += [(f"uniform4-seed{s}", Plan.uniform(L, 4, 16), none, dtype) for s in range(settings["seeds"])]
    plans.append(("uniform3", Plan.uniform(L, 3, 16), none, dtype))
    budget4 = parse_budget("4bit", bench.shapes, bench.backend)
    config4 = SearchConfig(budget_bytes=budget4, seq_len=settings["seq_len"], **bench.search_settings)
    planner = Planner(bench.shapes, bench.backend, PriorCost(bench.sensitivity, config4), config4)
    plans.append(("greedy", planner.fill(budget4), none, dtype))
    ours = {budget: searched(f"qradaptor-{budget}", budget) for budget in BUDGETS}
    # random search: the 4-bit budget and as many fine-tune steps as ours spent there
    plans.append(("random", *searched("random", "4bit", **bench.random_settings(ours["4bit"][1]["search_steps"])),
                  dtype))
    plans += [(f"qradaptor-{budget}", plan, cost, dtype) for budget, (plan, cost) in ours.items()]
    # ablation: the same search over bits only, every adapter at rank 16 (does redistributing bits alone help?)
    plans.append(("qradaptor-4bit-r16", *searched("qradaptor-4bit-r16", "4bit", ranks=(16,)), dtype))
    cache = bench.fitness.cache  # quantized layers the searches made, reused for the KL measurements

    kl_blocks = load_blocks(data, tokenizer, "test", seq_len=settings["seq_len"], max_blocks=settings["kl_blocks"])
    rows = []
    for name, plan, cost, dtype in plans:
        seed = int(name.rsplit("seed", 1)[1]) if "-seed" in name else 0
        final = run_final(bench.work, name, plan, settings, model, data, seed=seed, dtype=dtype)
        final.update(measure_rss(bench.work, name, plan, settings, model, data, dtype=dtype))
        run = json.loads((bench.work / name / "train" / "run.json").read_text())
        final["training_estimate_bytes"] = run["training_estimate"]["peak_bytes"]  # what `train` predicted
        # KL before training in fp32 for every method, as the fidelity study and the search's fitness measure it
        kl_path = bench.work / name / "kl-fp32.json"
        if not kl_path.is_file():
            kl = kl_to_full(base, plan, kl_blocks, cache, None)
            kl_path.write_text(json.dumps({"kl_before": kl}))
        rows.append({"name": name, "plan": plan.describe(), "plan_layers": plan.to_dict()["layers"], "seed": seed,
                     "code_bits": sum(c.bits for c in plan.layers) / L,  # decoder layers are equal in size
                     "dtype": dtype, **json.loads(kl_path.read_text()), **final, **cost})
        print(f"frontier: {name}: test loss {final['loss']:.4f}, {final['memory_bytes'] / 2**20:.1f} MiB", flush=True)

    # uniform4 is reported as the mean of its seeds, with the spread
    seeds = [r for r in rows if r["name"].startswith("uniform4-seed")]
    mean = {**seeds[0], "name": "uniform4", "seeds": [r["loss"] for r in seeds],
            "loss": sum(r["loss"] for r in seeds) / len(seeds),
            "loss_spread": max(r["loss"] for r in seeds) - min(r["loss"] for r in seeds)}
    mean["perplexity"] = math.exp(mean["loss"])
    for key in ("train_seconds", "peak_rss_bytes", "rss_before_training_bytes"):
        mean[key] = sum(r[key] for r in seeds) / len(seeds)
    methods = [r for r in rows if r not in seeds]
    methods.insert(1, mean)
    goals = targets(methods, settings["steps"])
    payload = {"settings": {**settings, "budgets": list(BUDGETS), "model": model or "smollm2-135m",
                            "data": data or "pydoc-topics", "smoke": args.smoke, "group_size": 64},
               "methods": methods, "uniform4_seeds": seeds, "targets": goals,
               "seconds": time.perf_counter() - start, "environment": environment()}
    md = report(methods, settings, goals, args.smoke)
    compute = settings["profile_seconds"] + sum(r["search_seconds"] + r["train_seconds"] for r in rows)
    payload["compute_seconds"] = compute
    md += (f"\nTime: {compute / 60:.0f} min in the profile, the searches and the final fine-tunes (measured parts, "
           f"summed; the KL and peak-RSS measurements add a few minutes).\n")
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    name = "frontier-smoke" if args.smoke else "frontier"
    write_results(name, payload, md, directory=directory)
    plot(methods, directory / f"{name}.png")
    print(md)


if __name__ == "__main__":
    main()
