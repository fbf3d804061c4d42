"""Quality-vs-memory frontier: qradaptor's plans against every uniform QLoRA-style setting, 16-bit LoRA and
simpler allocators, on SmolLM2-135M-Instruct with the default data, every method fine-tuned with the same
data, steps, seed and evaluation.

    lora16              LoRA r=16 on the bf16 base (unquantized): the quality ceiling
    qlora4-r16          uniform 4-bit HQQ + LoRA r16 with PEFT's zero start: QLoRA as a user runs it today, the
                        reference of the gap recovered (every other quantized method starts its adapters as `train`
                        does by default, ``adapter_init``)
    qdora4-r16          uniform 4-bit HQQ + DoRA r16 (QDoRA, the paper's other baseline), started as `train` starts it
    uniform{b}-r{r}     uniform b-bit HQQ + LoRA rank r, for b in {3, 4, 5, 6, 8} and r in {4, 8, 16, 32}: the settings
                        a user could pick by hand. Their best-uniform front (at each memory, the best setting that fits)
                        is the baseline; its settings run seeds 0, 1, 2. uniform4-r16 (QLoRA's) is the memory reference.
    uniform{b}-r{r}-g{g}  the same at group size 32 or 128 (a lever a uniform plan can have too): for each budget, group
                        size and bit-width, the largest rank that fits; they join the uniform family. (DoRA, the other
                        such lever, is the qdora4-r16 row: it ends where LoRA does, results/adapter_init.md.)
    greedy              bits and ranks from the sensitivity profile alone (greedy fill), 4-bit budget, no search
    random              random search (plans repaired into the 4-bit budget), as many fine-tune steps as ours
    qradaptor-<B>       the pipeline's search at budgets 3bit, 3.5bit, 4bit, 5bit; its plan runs seeds 0, 1, 2 (seed 0
                        continues the search's run of it, seeds 1 and 2 train it from step 0)
    qradaptor-4bit-r16  ablation: the same search over bits only, every adapter at rank 16

Per method: weight memory (measured, adapters included), average bits, trainable parameters, KL to the
full model before training (test split), held-out test loss and perplexity after training, the best uniform
setting within the method's budget, search cost (fine-tune steps, seconds), the final fine-tune's seconds (it runs
through `qradaptor.train` in its own process) and peak RSS during training (a separate fresh process trains the plan
for a few steps with the same batch shape and reads its own high-water mark, reset after the model is built).

    .venv/bin/python benchmarks/frontier.py            # SmolLM2: hours on 2 cores (the grid: ~30 fine-tunes), resumable
    .venv/bin/python benchmarks/frontier.py --smoke    # a tiny random model, a few minutes: keeps this script working
    .venv/bin/python benchmarks/frontier.py --partial  # what is measured so far, training nothing (frontier-partial.*)

Everything is resumable: searches, KL and peak RSS per method go to ``--work`` (default benchmarks/work/frontier);
final fine-tunes go to a store shared with benchmarks/fidelity.py and benchmarks/dtype.py (benchmarks/work/finals,
keyed by their settings: see ``run_final``); rerunning skips what is done. Writes
benchmarks/results/frontier.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import re
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

from benchmarks.common import (RESULTS, describe_cpu, environment, markdown_table, vm_bytes,  # noqa: E402
                               write_results)

BUDGETS = ("3bit", "3.5bit", "4bit", "5bit")
FINALS = Path(__file__).resolve().parent / "work" / "finals"  # see run_final
FINAL_EVAL_BLOCKS = 16  # the validation blocks a final fine-tune reports (`train`'s default --eval-blocks)
FULL = {  # SmolLM2 settings, chosen so the whole benchmark fits in about 1.5 h on 2 cores
    "adapter_init": "activation",  # `train`'s default (results before it had this key: "zero")
    "steps": 100, "seq_len": 128, "batch_size": 4, "lr": 3e-4, "seeds": 3, "kl_blocks": 16, "profile_tokens": 4096,
    "rss_steps": 5, "grid": {"bits": (3, 4, 5, 6, 8), "ranks": (4, 8, 16, 32), "group_sizes": (32, 128)},
    # 8 trials × 4 steps, the front's best plan and the warm start's 3 anchors promoted (+4 steps each, fewer where
    # they coincide), 1 refinement × 8, the chosen plan's 8 reused: at most 48 steps not reused, ≤ 0.5× the final
    # fine-tune (measured: 44–48, results/frontier.md). The fidelity study ranks on
    # prefix@8 as well as on prefix@12 (Spearman 0.988, 0.965 over the better half), so the full fidelity is 8.
    "search": {"trials": 8, "population": 4, "promote": 1, "refine": 1, "warm_start": 2, "alpha": 1.0,
               "cheap": {"name": "cheap", "steps": 4, "eval_blocks": 8},
               "full": {"name": "full", "steps": 8, "eval_blocks": 16}},
}
SMOKE = {
    "adapter_init": "activation",
    "steps": 4, "seq_len": 32, "batch_size": 4, "lr": 3e-4, "seeds": 2, "kl_blocks": 4, "profile_tokens": 256,
    "rss_steps": 2, "grid": {"bits": (3, 4, 8), "ranks": (4, 16), "group_sizes": (32,)},
    "search": {"trials": 4, "population": 2, "promote": 1, "refine": 1, "warm_start": 2, "alpha": 1.0,
               "cheap": {"name": "cheap", "steps": 1, "eval_blocks": 2},
               "full": {"name": "full", "steps": 2, "eval_blocks": 2}},
}


# ---------------------------------------------------------------------------------------- the final fine-tune


def train_dtype() -> str:
    """What `qradaptor train` computes in by default on this CPU (the finals of quantized plans and the searches
    use it)."""
    from qradaptor.precision import default_dtype

    return default_dtype("cpu").dtype


def final_run(spec_path: str) -> None:
    """Child process: the real ``qradaptor train`` stage on one plan, then the trained model's `held_out_losses`.
    Writes ``final.json`` next to the run."""
    from qradaptor.io import atomic_write_json
    from qradaptor.commands import train_plan
    from qradaptor.rundir import RunConfig

    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    if run_dir.exists():  # an interrupted earlier attempt: start over so its seconds are whole
        shutil.rmtree(run_dir)
    from qradaptor.commands.train import KeptRunMismatch

    start = time.perf_counter()
    settings = dict(plan=spec["plan"], model=spec["model"], data=spec["data"], steps=spec["steps"],
                    seq_len=spec["seq_len"], batch_size=spec["batch_size"], lr=spec["lr"], seed=spec["seed"],
                    dtype=spec["dtype"], eval_every=0, eval_blocks=FINAL_EVAL_BLOCKS, checkpoint_every=spec["steps"], progress=False,
                    adapter_init=spec.get("adapter_init", "zero"),
                    warmup_steps=spec.get("warmup_steps", RunConfig.warmup_steps))
    try:  # a search's run of the plan (its first steps), continued: the result is that of a run from step 0
        result = train_plan(run_dir, init_from=spec.get("init_from"), **settings)
    except KeptRunMismatch as e:
        print(f"frontier: not continuing {spec['init_from']} ({e.cause}); training from step 0", flush=True)
        result = train_plan(run_dir, **settings)
    seconds = time.perf_counter() - start
    from qradaptor.models import load_tokenizer

    held_out = held_out_losses(result.model, load_tokenizer(spec["model"]), spec["data"], spec["seq_len"])
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    estimate = json.loads((run_dir / "run.json").read_text())["training_estimate"]["peak_bytes"]
    atomic_write_json(Path(spec["result"]), {
        **held_out, "train_seconds": seconds, "train_loop_seconds": result.train.seconds,
        "trainable_params": trainable,
        "memory_bytes": result.metrics["memory"]["measured_bytes"],
        "predicted_bytes": result.metrics["memory"]["predicted_bytes"], "avg_bits": result.metrics["memory"]["avg_bits"],
        "final_train_loss": result.train.final_loss,
        "training_estimate_bytes": estimate,  # what `train` predicted its peak to be
        "train_losses": result.train.losses})  # per step, from step 1 (a continued run's kept steps included)


def held_out_losses(model, tokenizer, data, seq_len: int) -> dict:
    """What every final reports of held-out text: the loss on the whole test split (``loss``, the one the benchmarks
    compare), on the first `FINAL_EVAL_BLOCKS` validation blocks (``validation_loss``: what `train` reports) and on
    the whole validation split; and ``held_out``, the fingerprint of the splits they were taken on."""
    from qradaptor.data import load_blocks
    from qradaptor.evaluate import evaluate_loss

    test = evaluate_loss(model, load_blocks(data, tokenizer, "test", seq_len=seq_len), progress=False)
    validation = load_blocks(data, tokenizer, "validation", seq_len=seq_len)
    whole = evaluate_loss(model, validation, progress=False)
    first = evaluate_loss(model, validation.subset(FINAL_EVAL_BLOCKS), progress=False)
    return {"loss": test.loss, "perplexity": test.perplexity, "test_tokens": test.tokens,
            "validation_loss": first.loss, "validation_all_loss": whole.loss, "validation_tokens": whole.tokens,
            "held_out": held_out_fingerprint(data, seq_len)}


@functools.lru_cache(maxsize=None)
def held_out_fingerprint(data, seq_len: int) -> str:
    """The held-out splits' text, as a short key: a final's losses taken on other held-out text (the default
    corpus's before its held-out splits lost the paragraphs training holds, results/overlap.md) are stale."""
    import hashlib

    from qradaptor.data import data_fingerprint

    both = "".join(data_fingerprint(data, split, seq_len) for split in ("validation", "test"))
    return hashlib.sha256(both.encode()).hexdigest()[:16]


def held_out_current(result: dict, spec: dict) -> bool:
    """Whether a kept final's held-out losses were taken on today's held-out splits."""
    return result.get("held_out") == held_out_fingerprint(spec["data"], spec["seq_len"])


def evaluate_run(spec_path: str) -> None:
    """Child process: `held_out_losses` of a kept final's trained run (its training is unchanged: only the held-out
    text it was judged on changed). Writes them to the spec's ``result``."""
    from qradaptor.export import open_artifact
    from qradaptor.io import atomic_write_json

    spec = json.loads(Path(spec_path).read_text())
    model, tokenizer, _ = open_artifact(spec["run_dir"])
    atomic_write_json(Path(spec["result"]), held_out_losses(model, tokenizer, spec["data"], spec["seq_len"]))


def run_final(store: Path, label: str, plan, settings: dict, model, data, *, seed: int, dtype: str = "float32",
              init_from: str | None = None, train: bool = True) -> dict | None:
    """Train ``plan`` in a child process (the real training stage), or return the kept result of the same fine-tune.

    Finished fine-tunes are kept under a key of everything that decides their result (plan, model, data, steps,
    batch shape, learning rate, seed, dtype), so the uniform grid, the frontier and the fidelity study share each
    one instead of training it again, and a change of settings can never return another run's result. Two places
    keep them: ``store`` (benchmarks/work/finals: the training runs themselves) and its ledger (for the shared store,
    benchmarks/results/finals.json, committed with the results: the results alone, so that a fresh clone resumes a
    benchmark without training again what an earlier session measured). The key does not cover the code: after a
    change to training that changes its results, start afresh (delete the store and the ledger). ``init_from``: a
    search's kept run of the plan to continue (not part of the key: the result is exactly that of a run from step 0;
    ``train_seconds`` then counts only the steps trained here). Returns the child's result, plus ``run_dir`` (the
    training run's directory; None for a result from the ledger, whose run is not on this machine). ``train``
    False: only a kept result (None where there is none; a stale held-out evaluation is still taken again)."""
    from qradaptor.io import atomic_write_json

    spec = final_spec(plan, settings, model, data, seed=seed, dtype=dtype)
    key, ledger = final_key(spec), ledger_path(store)
    where = store / key
    result_path = where / "final.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        metrics = where / "train" / "metrics.json"
        if "train_losses" not in result and metrics.is_file():  # a final taken before results kept their curve
            result["train_losses"] = json.loads(metrics.read_text())["train_losses"]
            entry = read_ledger(ledger).get(key)
            if entry is not None and "train_losses" not in entry["result"]:  # the ledger keeps it too, from now on
                add_to_ledger(ledger, key, {**entry, "result": {**entry["result"],
                                                                "train_losses": result["train_losses"]}})
        if not held_out_current(result, spec) and (where / "train" / "run.json").is_file():
            result = reevaluate(where, label, plan, spec, result)
        if held_out_current(result, spec):
            return {**result, "run_dir": str(where / "train")}
    kept = read_ledger(ledger).get(key)
    if kept is not None and held_out_current(kept["result"], spec):  # else trained again: its run is not here
        return {**kept["result"], "run_dir": None}
    if not train:
        return None
    where.mkdir(parents=True, exist_ok=True)
    spec_path = atomic_write_json(where / "spec.json", {**spec, "run_dir": str(where / "train"),
                                                        "result": str(result_path), "label": label,
                                                        "init_from": init_from})
    print(f"frontier: {label}: final fine-tune ({plan.describe()})", flush=True)
    child(label, "--final-run", spec_path)
    result = json.loads(result_path.read_text())
    add_to_ledger(ledger, key, {"label": label, "plan": plan.describe(),
                                **{k: v for k, v in spec.items() if k != "plan"}, "result": result})
    return {**result, "run_dir": str(where / "train")}


def reevaluate(where: Path, label: str, plan, spec: dict, result: dict) -> dict:
    """A kept final whose held-out losses are stale (`held_out_current`), judged again on today's held-out splits
    in a child process (seconds, against minutes to train it again). Its earlier losses stay in the result, under
    ``earlier_held_out``; the store and the ledger keep the new ones."""
    from qradaptor.io import atomic_write_json

    print(f"frontier: {label}: held-out losses taken again on today's held-out splits", flush=True)
    spec_path = atomic_write_json(where / "evaluate-spec.json", {**spec, "run_dir": str(where / "train"),
                                                                 "result": str(where / "held-out.json")})
    child(label, "--evaluate-run", spec_path)
    held_out = json.loads((where / "held-out.json").read_text())
    earlier = {k: result[k] for k in ("loss", "perplexity", "test_tokens", "validation_loss", "validation_all_loss",
                                      "held_out") if k in result}
    result = {**result, **held_out, "earlier_held_out": earlier}
    atomic_write_json(where / "final.json", result)
    ledger, key = ledger_path(where.parent), where.name
    entry = read_ledger(ledger).get(key) or {"label": label, "plan": plan.describe(),
                                             **{k: v for k, v in spec.items() if k != "plan"}}
    add_to_ledger(ledger, key, {**entry, "result": result})
    return result


def final_spec(plan, settings: dict, model, data, *, seed: int, dtype: str) -> dict:
    """Everything that decides a final fine-tune's result (what `final_key` hashes)."""
    from qradaptor.rundir import RunConfig

    spec = {"plan": plan.to_dict(), "model": model, "data": data, "steps": settings["steps"],
            "seq_len": settings["seq_len"], "batch_size": settings["batch_size"], "lr": settings["lr"], "seed": seed,
            "dtype": dtype}
    if settings.get("adapter_init", "zero") != "zero":  # the ledger's earlier keys (all zero starts) stay valid
        spec["adapter_init"] = settings["adapter_init"]
    if settings.get("warmup_steps", RunConfig.warmup_steps) != RunConfig.warmup_steps:  # likewise
        spec["warmup_steps"] = settings["warmup_steps"]
    return spec


def ledger_path(store: Path) -> Path:
    """Where the results of ``store``'s fine-tunes are listed: the shared store's in benchmarks/results (committed),
    any other's (a smoke run's) beside it."""
    return RESULTS / "finals.json" if store == FINALS else store.parent / f"{store.name}-ledger.json"


def read_ledger(path: Path) -> dict:
    return json.loads(path.read_text())["finals"] if path.is_file() else {}


def add_to_ledger(path: Path, key: str, entry: dict) -> None:
    """Add one fine-tune's result (the benchmarks that share the store run one at a time: no lock)."""
    from qradaptor.io import atomic_write_json

    finals = read_ledger(path)
    finals[key] = entry
    atomic_write_json(path, {"about": "results of the benchmarks' final fine-tunes, by the key of their settings "
                                      "(benchmarks/frontier.py run_final)", "finals": dict(sorted(finals.items()))})


def ledger_notice(finals: dict, dtype: str) -> str:
    """What of the ledger a benchmark can reuse on this machine: its quantized plans' finals train in ``dtype``
    (`train_dtype`), and a final taken in another dtype is another fine-tune (on a CPU without native bf16 the
    ledger's bf16 finals would all be trained again, in float32, and compared among themselves only)."""
    counts: dict[str, int] = {}
    for entry in finals.values():
        counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    other = {d: n for d, n in sorted(counts.items()) if d != dtype}
    line = f"benchmarks: quantized plans train in {dtype} here; the ledger holds {counts.get(dtype, 0)} finals in {dtype}"
    if other:
        line += (" and " + ", ".join(f"{n} in {d}" for d, n in other.items())
                 + " (reused only where this run trains in that dtype: bf16 LoRA rows, or another machine)")
    if dtype != "bfloat16":
        line += "; this CPU has no native bf16, where the bf16 LoRA rows train ~15x slower (results/cpu_dtype.md)"
    return line


def final_key(spec: dict) -> str:
    """The store key of a final fine-tune: a hash of its settings (``spec`` without paths or labels)."""
    import hashlib

    kept = {k: v for k, v in spec.items() if k not in ("run_dir", "result", "label", "init_from")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _drop_if_stale(result_path: Path, spec_path: Path, spec: dict) -> None:
    """Remove a kept result that an earlier run made with other settings (dtype, steps, plan, seed): rerunning the
    benchmark after its settings changed must not report it as this one's."""
    paths = ("run_dir", "result")
    if result_path.is_file() and spec_path.is_file():
        kept = json.loads(spec_path.read_text())
        if {k: v for k, v in kept.items() if k not in paths} != {k: v for k, v in spec.items() if k not in paths}:
            result_path.unlink()


#: Run the children's code in this process instead (`children_in_process`).
CHILDREN_IN_PROCESS = False


def children_in_process() -> None:
    """Smoke runs call a final fine-tune's and an RSS measurement's code in this process: a child process spends
    ~15 s importing torch, transformers and PEFT on 2 cores, far more than a tiny model's fine-tune (most of a smoke's
    time), and smoke results measure nothing (a smoke row's peak RSS is then this process's). The child processes
    themselves are tested on their own (tests/test_benchmarks.py)."""
    global CHILDREN_IN_PROCESS
    CHILDREN_IN_PROCESS = True


def child(name: str, mode: str, spec_path: Path) -> None:
    if CHILDREN_IN_PROCESS:
        {"--final-run": final_run, "--rss-run": rss_run, "--evaluate-run": evaluate_run}[mode](str(spec_path))
        return
    code = subprocess.call([sys.executable, str(Path(__file__).resolve()), mode, str(spec_path)])
    if code != 0:
        sys.exit(f"frontier: {mode[2:]} of {name} failed (exit {code}); rerun to retry it")


# ---------------------------------------------------------------------------------------- peak RSS


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
    before = vm_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    train(model, blocks, TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"],
                                     seed=spec["seed"]), progress=False)
    atomic_write_json(Path(spec["result"]), {"peak_rss_bytes": vm_bytes("VmHWM"),
                                             "rss_before_training_bytes": before, "steps": spec["steps"]})


def _rss_spec(result_path: Path, plan, settings: dict, model, data, dtype: str) -> dict:
    return {"result": str(result_path), "plan": plan.to_dict(), "model": model, "data": data,
            "steps": settings["rss_steps"], "seq_len": settings["seq_len"], "batch_size": settings["batch_size"],
            "lr": settings["lr"], "seed": 0, "dtype": dtype}


def measure_rss(work: Path, name: str, plan, settings: dict, model, data, *, dtype: str) -> dict:
    """Peak RSS of ``plan``'s training in a fresh process (or the earlier measurement)."""
    from qradaptor.io import atomic_write_json

    result_path, spec_path = work / name / "rss.json", work / name / "rss-spec.json"
    spec = _rss_spec(result_path, plan, settings, model, data, dtype)
    _drop_if_stale(result_path, spec_path, spec)
    if not result_path.is_file():
        child(name, "--rss-run", atomic_write_json(spec_path, spec))
    return json.loads(result_path.read_text())


#: What a committed result's KL and peak RSS were measured with: a row's are taken over only where these agree.
_MEASURED_WITH = ("rss_steps", "seq_len", "batch_size", "lr", "kl_blocks", "model", "data")


def committed_rows(paths: list[Path], settings: dict, model, data) -> dict[str, list[dict]]:
    """The rows of committed frontier results (``paths``, in that order) whose KL and peak RSS were measured with
    ``settings`` (`_MEASURED_WITH`), by name."""
    given = {**settings, "model": model or "smollm2-135m", "data": data or "pydoc-topics"}
    kept: dict[str, list[dict]] = {}
    for path in paths:
        if path.is_file():
            payload = json.loads(path.read_text())
            if all(payload["settings"].get(k) == given.get(k) for k in _MEASURED_WITH):
                for row in payload["methods"]:
                    kept.setdefault(row["name"], []).append(row)
    return kept


def reuse_measurement(work: Path, rows: list[dict], name: str, plan, final: dict, settings: dict, model, data,
                      dtype: str) -> bool:
    """Take a committed row's KL before training and peak RSS (the first of ``rows`` that measured the same plan in
    the same dtype on the same held-out split as ``final``) into the work directory, where it lacks both: a fresh
    checkout then measures only rows never measured. True where it took them."""
    from qradaptor.io import atomic_write_json

    result_path, kl_path = work / name / "rss.json", work / name / "kl-fp32.json"
    row = next((r for r in rows if r.get("dtype") == dtype and r.get("plan_layers") == plan.to_dict()["layers"] and
                r.get("held_out") == final.get("held_out") and r.get("peak_rss_bytes") is not None and
                r.get("kl_before") is not None), None)
    if row is None or result_path.is_file() or kl_path.is_file():
        return False
    atomic_write_json(work / name / "rss-spec.json", _rss_spec(result_path, plan, settings, model, data, dtype))
    atomic_write_json(result_path, {"peak_rss_bytes": row["peak_rss_bytes"], "steps": settings["rss_steps"],
                                    "rss_before_training_bytes": row.get("rss_before_training_bytes")})
    atomic_write_json(kl_path, {"kl_before": row["kl_before"]})
    return True


# ---------------------------------------------------------------------------------------- shared set-up


class Bench:
    """The model, the one sensitivity profile and the one fitness (with its quantization cache) that every
    search of a benchmark run shares; also used by benchmarks/search.py, which reuses the same work dir."""

    def __init__(self, work: str | None, *, smoke: bool, data: str | None = None, lr: float | None = None):
        from qradaptor.backends import get_backend
        from qradaptor.memory import ModelShapes
        from qradaptor.models import load_model
        from qradaptor.profile import RESULT_FILE, ProfileSettings, Sensitivity, profile_model
        from qradaptor.search import FineTuneFitness, SearchConfig

        self.smoke, self.settings = smoke, dict(SMOKE if smoke else FULL)
        # another learning rate than the recipe's: searches of its own (their fine-tunes train at it), kept apart
        own_lr = lr is not None and lr != self.settings["lr"]
        if lr is not None:
            self.settings["lr"] = lr
        default_work = Path(__file__).resolve().parent / "work" / ("frontier" + (f"-lr{lr:g}" if own_lr else ""))
        self.work = Path(work or (tempfile.mkdtemp(prefix="qradaptor-bench-") if smoke else default_work))
        self.work.mkdir(parents=True, exist_ok=True)
        # finished final fine-tunes, shared by the frontier, its uniform grid and the fidelity study (run_final)
        self.finals = self.work / "finals" if smoke else FINALS
        self.model, self.data = None, data  # the defaults (SmolLM2, the reference-manual topics), or this data
        if smoke:
            from benchmarks.search import smoke_model

            children_in_process()

            self.model, words = smoke_model(self.work)
            self.data = data or words
        self.base, self.tokenizer = load_model(self.model)
        self.shapes = ModelShapes.from_model(self.base)
        self.backend = get_backend("hqq")

        if not smoke:
            print(ledger_notice(read_ledger(ledger_path(self.finals)), train_dtype()), file=sys.stderr, flush=True)

        # Stage 1, once: the sensitivity profile every search and the greedy allocator use.
        self.profile_path = self.work / "profile" / RESULT_FILE
        seconds = self.work / "profile" / "seconds.txt"
        if not self.profile_path.is_file():
            t = time.perf_counter()
            profile_model(self.base, self.tokenizer,
                          ProfileSettings(tokens=self.settings["profile_tokens"], seq_len=self.settings["seq_len"],
                                          dtype=train_dtype(), data=self.data),
                          out=self.profile_path.parent, force=True, progress=not smoke)
            seconds.write_text(f"{time.perf_counter() - t:.1f}\n")
        self.sensitivity = Sensitivity.load(self.profile_path)
        self.profile_seconds = float(seconds.read_text())

        self.search_settings = dict(self.settings["search"])
        self.trials, self.alpha = self.search_settings.pop("trials"), self.search_settings.pop("alpha")
        # float32, fine-tunes of their own schedule: the fidelity study's loss@K signals and KL measurements
        self.fitness = FineTuneFitness(self.base, self.tokenizer, data=self.data,
                                       config=SearchConfig(budget_bytes=1, seq_len=self.settings["seq_len"], seed=0,
                                                           adapter_init=self.settings["adapter_init"]))
        self._prefix_fitness = None

    def prefix_fitness(self):
        """The fitness in the final fine-tune's dtype (the model loaded as `train` loads it): the searches' (as
        `qradaptor run` searches: on the first steps of the final fine-tune's schedule, each search keeping its
        plans' runs in its own directory) and the fidelity study's prefix signals."""
        if self._prefix_fitness is None:
            import torch

            from qradaptor.models import load_model
            from qradaptor.search import FineTuneFitness

            model, _ = load_model(self.model, dtype=getattr(torch, train_dtype()))
            self._prefix_fitness = FineTuneFitness(model, self.tokenizer, data=self.data, config=self.fitness.config)
        return self._prefix_fitness

    @functools.cached_property
    def pricing(self):
        """The backend that prices plans in the final fine-tune's dtype (bf16 scales, zeros and unquantized tensors
        where it trains in bf16): as the searches price their budgets and the trained models are measured. Made once:
        corpus.py prices every grid setting with it."""
        from qradaptor.backends import backend_for

        return backend_for(self.prefix_fitness().model, "hqq")

    def started_fitness(self, adapter_init: str):
        """`prefix_fitness` with its plans' adapters started as ``adapter_init`` (`FineTuneFitness.with_start`): a
        fitness starts adapters as its own config says, and a search refuses one that differs from its own."""
        return self.prefix_fitness().with_start(adapter_init)

    def search_profile(self, *, modules: bool = False) -> Path:
        """The sensitivity profile of the model in the final fine-tune's dtype, which the searches read (a profile
        is of one model's weights, their dtype included), made once; with ``modules``, with per-linear estimates
        (`ProfileSettings.modules`: what searches with finer genes read). Its seconds go to ``seconds.txt``."""
        from qradaptor.profile import RESULT_FILE, ProfileSettings, profile_model

        path = self.work / (f"profile-{train_dtype()}" + ("-modules" if modules else "")) / RESULT_FILE
        if not path.is_file():
            t = time.perf_counter()
            profile_model(self.prefix_fitness().model, self.tokenizer,
                          ProfileSettings(tokens=self.settings["profile_tokens"], seq_len=self.settings["seq_len"],
                                          dtype=train_dtype(), data=self.data, modules=modules),
                          out=path.parent, force=True, progress=not self.smoke)
            (path.parent / "seconds.txt").write_text(f"{time.perf_counter() - t:.1f}\n")
        return path

    def search(self, name: str, budget: str, *, sensitivity: Path | None = None, **extra):
        """Run (or resume, or reload when finished) the search ``name`` in ``work/name/search``, as `qradaptor run`
        searches: in the final fine-tune's dtype, on the first steps of its schedule, keeping the chosen plan's
        run for the final fine-tune to continue (``result.kept_run``). ``sensitivity``: the profile it reads
        (default `search_profile`). Its fine-tunes train at the final's rate, as `run`'s do (`search_rate`)."""
        from qradaptor.commands import search
        from qradaptor.commands.search import prefix_fidelities
        from qradaptor.search import RUNS_DIR, search_rate

        out = self.work / name / "search"
        settings = prefix_fidelities({"trials": self.trials, "seq_len": self.settings["seq_len"], "seed": 0,
                                      "adapter_init": self.settings["adapter_init"], **self.search_settings, **extra}, steps=self.settings["steps"],
                                     batch_size=self.settings["batch_size"], lr=search_rate(self.settings["lr"]))
        fitness = self.started_fitness(settings["adapter_init"])  # its fine-tunes start as the search records
        fitness.runs = out / RUNS_DIR
        return search(self.model, data=self.data, budget=budget, out=out, alpha=self.alpha,
                      sensitivity=str(sensitivity or self.search_profile()), progress=not self.smoke,
                      fitness=fitness, dtype=train_dtype(), **settings)

    def search_cost(self, name: str, result) -> dict:
        """Fine-tune steps and seconds of a search, from its storage (a resumed search counts every session)."""
        import optuna

        seconds = 0.0
        for study in ("qradaptor", "qradaptor:refine"):
            loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{self.work / name / 'search' / 'study.db'}")
            seconds += sum((t.datetime_complete - t.datetime_start).total_seconds() for t in loaded.trials
                           if t.datetime_complete and t.datetime_start)
        # the final fine-tune continues the chosen plan's search run: those steps are not spent twice
        return {"search_steps": result.fine_tune_steps, "search_steps_reused": result.kept_step,
                "search_seconds": seconds, "search_evaluations": len(result.points)}

    def final_seeds(self, label: str, plan, settings: dict, *, dtype: str, search=None) -> dict:
        """``plan``'s final fine-tune with every seed of ``settings`` (`run_final`; seed 0 continues ``search``'s
        kept run of it, where a search found it): the losses, their seconds and the plan's measured memory (the
        same for every seed; the ledger's oldest entries lack it) and each seed's training loss per step (None where
        the ledger's entry predates them)."""
        losses, seconds, memories, curves = [], [], [], []
        for seed in range(settings["seeds"]):
            kept = search.kept_run if search is not None and seed == 0 else None
            final = run_final(self.finals, label + (f" seed {seed}" if seed else ""), plan, settings, self.model,
                              self.data, seed=seed, dtype=dtype, init_from=str(kept) if kept else None)
            losses.append(final["loss"])
            seconds.append(final["train_seconds"])
            memories.append(final.get("memory_bytes"))
            curves.append(final.get("train_losses"))  # None for the ledger's older finals
        return {"seeds": losses, "train_seconds": seconds, "memory_bytes": next(m for m in memories if m is not None),
                "train_losses": curves}

    def random_settings(self, steps: int) -> dict:
        """Random search settings that spend about ``steps`` fine-tune steps (cheap trials, then promotion, which
        continues the cheap runs)."""
        cheap, full = self.search_settings["cheap"]["steps"], self.search_settings["full"]["steps"]
        trials = max(1, round((steps - self.search_settings["promote"] * (full - cheap)) / cheap))
        return {"trials": trials, "refine": 0, "sampler": "random"}


# ---------------------------------------------------------------------------------------- before training


def kl_to_full(base, plan, blocks, cache, dtype) -> float:
    """Mean per-token KL(full ‖ quantized) on ``blocks`` of the plan's quantized base alone (no adapters)."""
    from qradaptor.quantize import quantize_model

    return kl_to(base, quantize_model(base, plan, cache=cache, dtype=dtype), blocks)


def kl_to(reference, model, blocks) -> float:
    """Mean per-token KL(reference ‖ model) on ``blocks``."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), 4):
            ids = blocks.input_ids[i : i + 4]
            p = torch.log_softmax(reference(input_ids=ids).logits.float(), -1)
            q = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum())
            tokens += ids.numel()
    return total / tokens


# ---------------------------------------------------------------------------------------- the report


def front(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (memory, loss), by memory."""
    out = [r for r in rows if not any(o is not r and o["memory_bytes"] <= r["memory_bytes"] and o["loss"] <= r["loss"]
                                      and (o["memory_bytes"], o["loss"]) != (r["memory_bytes"], r["loss"]) for o in rows)]
    return sorted(out, key=lambda r: r["memory_bytes"])


# The gap to close runs from QLoRA as a user runs it today, uniform 4-bit r16 with PEFT's zero start, to 16-bit
# LoRA (issue #29); the uniform grid trains with the benchmark's start, as the searches' plans do.
REFERENCE = "qlora4-r16"
QDORA = "qdora4-r16"


def gap_recovered(reference: float, row: float, ceiling: float) -> float | None:
    """The share of the gap from ``reference`` (QLoRA as run today) to ``ceiling`` (16-bit LoRA) that ``row``'s loss
    closes; None where there is no gap to close."""
    gap = reference - ceiling
    return (reference - row) / gap if gap > 0 else None


def recipe(name: str, settings: dict) -> dict:
    """The fine-tune settings of row ``name``: the reference's plain zero start, or the benchmark's."""
    return {**settings, "adapter_init": "zero"} if name == REFERENCE else settings


def uniform_name(bits: int, rank: int, group_size: int = 64) -> str:
    return f"uniform{bits}-r{rank}" + (f"-g{group_size}" if group_size != 64 else "")


def is_uniform(name: str) -> bool:
    return re.fullmatch(r"uniform\d+-r\d+(-g\d+)?", name) is not None


def group_size_settings(shapes, backend, budgets: list[int], grid: dict) -> list[tuple[int, int, int]]:
    """(bits, rank, group size): the uniform settings at the grid's other group sizes that the budgets compare with.
    A user can give a uniform plan a group size too (issue #29: the best uniform setting is judged with the levers a
    uniform plan can have), but all of them would double the grid: for each budget, group size and bit-width, the
    largest rank of the grid whose plan fits (priced by ``backend``, as the fine-tunes store it)."""
    from qradaptor.memory import predict
    from qradaptor.plan import Plan

    chosen = set()
    for budget, size, bits in itertools.product(budgets, grid.get("group_sizes", ()), grid["bits"]):
        fits = [r for r in grid["ranks"] if predict(shapes, Plan.uniform(shapes.num_layers, bits, r, group_size=size),
                                                    backend).total_bytes <= budget]
        if fits:
            chosen.add((bits, max(fits), size))
    return sorted(chosen)


def best_uniform_front(methods: list[dict]) -> list[dict]:
    """The best-uniform front: at each memory, the best uniform setting that fits (seed means where seeds ran)."""
    return front([m for m in methods if is_uniform(m["name"])])


def best_uniform_within(methods: list[dict], budget_bytes: int) -> dict | None:
    fits = [m for m in methods if is_uniform(m["name"]) and m["memory_bytes"] <= budget_bytes]
    return min(fits, key=lambda m: m["loss"]) if fits else None


def budget_searches(rows: list[dict]) -> list[dict]:
    """The searches' rows at the budgets (`qradaptor-3bit` … `-5bit`): what the targets compare; not the ablation."""
    return [r for r in rows if r["name"].startswith("qradaptor-") and r["name"] != "qradaptor-4bit-r16"]


def first_rows(given: str, rows: list[str], seeds: int) -> dict[str, int]:
    """``--first``'s rows, in its order, each with the number of seeds to train first (``ROW`` or ``ROW:SEEDS``,
    comma-separated; 1 to ``seeds``). Exits with one message for a row this run lacks or a count out of range."""
    asked = {}
    for entry in filter(None, given.split(",")):
        name, _, count = entry.partition(":")
        if not (count or "1").isdigit() or not 1 <= int(count or 1) <= seeds:
            raise SystemExit(f"frontier: --first {entry}: the number of seeds must be a whole number from 1 to "
                             f"{seeds}, e.g. --first {name}:{seeds}")
        asked[name] = int(count or 1)
    unknown = sorted(set(asked) - set(rows))
    if unknown:
        raise SystemExit(f"frontier: --first names rows this run does not have: {', '.join(unknown)} (rows: "
                         f"{', '.join(rows)})")
    return asked


def seeded(rows: list[dict], seeds_for: str) -> list[dict]:
    """The rows that get every seed: the searches' plans at the budgets, the gap's reference (`REFERENCE`), QDoRA and the
    uniform settings they are compared with, either the whole best-uniform front (``front``) or only the best
    uniform setting within each budget (``budgets``), on the current seed means."""
    ours = budget_searches(rows) + [r for r in rows if r["name"] in (REFERENCE, QDORA)]
    if seeds_for == "front":
        return ours + best_uniform_front(rows)
    best = [best_uniform_within(rows, r["budget_bytes"]) for r in budget_searches(rows)]
    return ours + list({id(r): r for r in best if r is not None}.values())


def fill_seeds(rows: list[dict], seeds_for: str, seeds: int, final, *, train: bool) -> None:
    """Give the `seeded` rows their other seeds, each row's mean and spread taken over its seeds. The front is taken
    on the seed means, so every seed already kept is read first (on seed 0 alone a row can look like a front row
    until the others' seeds are in), and only then is one more seed trained, for the first row still short of them.
    ``final(row, seed, fine_tune)``: that seed's final (`run_final`), or None where it is not kept and ``fine_tune``
    is False. ``train`` False (--partial): only kept seeds."""

    def add(row: dict, seed: int, fine_tune: bool) -> bool:
        extra = final(row, seed, fine_tune)
        if extra is None:
            return False
        row["seeds"].append(extra["loss"])
        row.setdefault("seed_train_seconds", []).append(extra["train_seconds"])
        row["loss"] = sum(row["seeds"]) / len(row["seeds"])
        row["loss_spread"] = max(row["seeds"]) - min(row["seeds"])
        row["perplexity"] = math.exp(row["loss"])
        return True

    while True:
        todo = [r for r in seeded(rows, seeds_for) if len(r["seeds"]) < seeds]
        kept = False
        for r in todo:
            while len(r["seeds"]) < seeds and add(r, len(r["seeds"]), False):
                kept = True
        if kept:  # the front may have moved: take it again
            continue
        if not todo or not train or not add(todo[0], len(todo[0]["seeds"]), True):
            return  # done, or --partial: the seeds still missing are not trained yet


def targets(methods: list[dict], final_steps: int) -> dict:
    """Issue 16's targets: at every budget, qradaptor's final loss against the best uniform setting that fits it
    (seed means; better by more than the larger seed spread of the two at two or more budgets), the share of the gap
    between uniform 4-bit (rank 16) and 16-bit LoRA recovered at the 4-bit budget, and the search's cost."""
    by = {m["name"]: m for m in methods}
    ref, ceiling = by[REFERENCE], by["lora16"]
    budgets = {}
    for m in budget_searches(methods):
        best = best_uniform_within(methods, m["budget_bytes"])
        best_spread, own_spread = (best or {}).get("loss_spread") or 0.0, m.get("loss_spread") or 0.0
        spread = max(best_spread, own_spread)  # the larger of the two seed spreads (max − min over each side's seeds)
        budgets[m["name"].removeprefix("qradaptor-")] = {
            "budget_bytes": m["budget_bytes"], "loss": m["loss"], "best_uniform": best and best["name"],
            "best_uniform_loss": best and best["loss"], "best_uniform_spread": best_spread, "loss_spread": own_spread,
            "delta": best and m["loss"] - best["loss"],
            "no_worse": best is None or m["loss"] <= best["loss"],
            "better_beyond_spread": best is not None and best["loss"] - m["loss"] > spread}
    q4 = by.get("qradaptor-4bit")
    recovered = gap_recovered(ref["loss"], q4["loss"], ceiling["loss"]) if q4 else None
    # counting only the steps the final fine-tune does not reuse (it continues the chosen plan's search run)
    costs = {m["name"]: (m["search_steps"] - m.get("search_steps_reused", 0)) / final_steps for m in methods
             if m["name"].startswith("qradaptor")}
    beyond = sum(b["better_beyond_spread"] for b in budgets.values())
    return {
        "budgets": budgets,
        "no_worse_than_best_uniform_at_every_budget": all(b["no_worse"] for b in budgets.values()),
        "budgets_better_beyond_seed_spread": beyond,
        "better_beyond_seed_spread_at_two_or_more_budgets": beyond >= 2,
        "reference": REFERENCE, "reference_loss": ref["loss"], "reference_loss_spread": ref.get("loss_spread"),
        "gap_reference_minus_lora16": ref["loss"] - ceiling["loss"],
        "gap_recovered_at_4bit": recovered,
        "gap_recovered_at_least_half": bool(recovered is not None and recovered >= 0.5),
        "search_cost_in_final_fine_tunes": costs,
        "search_cost_at_most_half": all(c <= 0.5 for c in costs.values()),
    }


STYLE = {"lora16": ("*", "black"), "greedy": ("^", "#1b9e77"), "random": ("D", "#7570b3"),
         REFERENCE: ("P", "#e7298a"), QDORA: ("X", "#66a61e")}  # qradaptor: blue
BITS_COLOUR = {2: "#fdd0a2", 3: "#fdae6b", 4: "#fd8d3c", 5: "#e6550d", 6: "#a63603", 8: "#7f2704"}


def plot(methods: list[dict], path: Path) -> None:
    """Held-out loss vs memory: the uniform grid (squares, darker = more bits, labelled bits/rank) and its best-uniform
    front (the step line), the other methods, and a zoom on the budgets' range where the methods sit close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5.2))
    ours = [m for m in methods if m["name"].startswith("qradaptor")]
    f = best_uniform_front(methods)
    lo = min(m["memory_bytes"] for m in ours + f) * 0.97
    hi = max(m.get("budget_bytes", m["memory_bytes"]) for m in ours) * 1.03
    in_zoom = [m for m in methods if lo <= m["memory_bytes"] <= hi]
    shades = itertools.cycle(["#c6dbef", "#6baed6", "#2171b5", "#08306b", "#9e9ac8"])
    colours = {m["name"]: next(shades) for m in ours}
    for axis in (ax, zoom):
        for m in methods if axis is ax else in_zoom:
            if is_uniform(m["name"]):
                bits = int(m["name"][7:].split("-")[0])
                marker, colour, label = "s", BITS_COLOUR.get(bits, "grey"), None
                axis.annotate(m["name"][7:].replace("-r", "/"), (m["memory_bytes"] / mib, m["loss"]), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
            else:
                marker, colour = STYLE.get(m["name"], ("o", colours.get(m["name"])))
                label = m["name"] if axis is ax else None
            axis.errorbar(m["memory_bytes"] / mib, m["loss"], yerr=m.get("loss_spread", 0) / 2 or None, fmt=marker,
                          color=colour, markersize=9 if marker == "*" else 5, capsize=2, label=label)
        xs = [m["memory_bytes"] / mib for m in f] + [max(m["memory_bytes"] for m in methods) / mib]
        axis.step(xs, [m["loss"] for m in f] + [f[-1]["loss"]], where="post", color="#d95f02", lw=1, ls="--",
                  label="best uniform setting that fits" if axis is ax else None)
        axis.grid(alpha=0.3)
        axis.set_xlabel("weight memory incl. adapters (MiB, measured)")
    for m in ours:  # the budgets (a plan of a budget is left of its line)
        if "budget_bytes" in m and m["name"] != "qradaptor-4bit-r16":
            zoom.axvline(m["budget_bytes"] / mib, color="grey", ls=":", lw=0.8)
            zoom.annotate(m["name"].removeprefix("qradaptor-"), (m["budget_bytes"] / mib, 1), fontsize=6,
                          xycoords=("data", "axes fraction"), xytext=(2, -10), textcoords="offset points")
    top = max([m["loss"] for m in ours] + [m["loss"] for m in f if lo <= m["memory_bytes"] <= hi])
    zoom.set_xlim(lo / mib, hi / mib)
    zoom.set_ylim(min(m["loss"] for m in in_zoom) - 0.01, top + 0.02)
    zoom.set_title("zoom: the budgets' range", fontsize=9)
    ax.set_ylabel("held-out test loss after fine-tuning")
    ax.set_title("SmolLM2-135M: quality vs memory, same fine-tune for every method", fontsize=10)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report(methods: list[dict], settings: dict, goals: dict, smoke: bool) -> str:
    by = {m["name"]: m for m in methods}
    ref, ceiling = by[REFERENCE], by["lora16"]
    on_front = {m["name"] for m in best_uniform_front(methods)}
    rows = []
    for m in sorted(methods, key=lambda m: (not m["name"] == "lora16", not is_uniform(m["name"]),
                                            m["memory_bytes"] if is_uniform(m["name"]) else 0)):
        recovered = gap_recovered(ref["loss"], m["loss"], ceiling["loss"])
        recovered = float("nan") if recovered is None else recovered
        fits = best_uniform_within(methods, m["budget_bytes"]) if "budget_bytes" in m else None
        rows.append([m["name"] + (" ◆" if m["name"] in on_front else ""), f"{m['memory_bytes'] / 2**20:.1f}",
                     f"{m['memory_bytes'] / ref['memory_bytes']:.3f}", f"{m['code_bits']:.2f}", f"{m['avg_bits']:.2f}",
                     f"{m['trainable_params'] / 1e6:.2f}M", f"{m['kl_before']:.4f}",
                     f"{m['loss']:.4f}" + (f" ± {m['loss_spread'] / 2:.4f}" if m.get("loss_spread") else ""),
                     f"{m['perplexity']:.2f}", f"{m['loss'] - ref['loss']:+.4f}", f"{100 * recovered:.0f}%",
                     f"{fits['name']} {m['loss'] - fits['loss']:+.4f}" if fits else "—",
                     f"{m['search_steps']}" + (f" ({m['search_steps_reused']} reused)"
                                               if m.get("search_steps_reused") else ""),
                     f"{(m['search_steps'] - m.get('search_steps_reused', 0)) / settings['steps']:.2f}",
                     f"{m['search_seconds']:.0f}",
                     f"{m['train_seconds']:.0f}", f"{m['peak_rss_bytes'] / 2**20:.0f}",
                     f"{m['rss_before_training_bytes'] / 2**20:.0f}", f"{m['training_estimate_bytes'] / 2**20:.0f}",
                     m["plan"].replace("|", "/")])
    title = "a tiny random model (smoke)" if smoke else "SmolLM2-135M-Instruct"
    grid = settings["grid"]
    md = (f"# Quality vs memory on {title}\n\n"
          f"Every method: {settings['steps']} LoRA steps of {settings['batch_size']}×{settings['seq_len']} tokens "
          f"(lr {settings['lr']}, seed 0, adapters started `{settings.get('adapter_init', 'zero')}`: "
          f"qradaptor.adapter_init) on the default data's training split, held-out loss on the whole test split "
          f"({methods[0]['test_tokens']} tokens). HQQ group size 64 where the row does not say otherwise; the shipped SmolLM2 weights were already "
          f"4-bit at group size 32 (GGUF Q4_1), dequantized to fp32 before anything here. Quantized runs compute in "
          f"{settings['dtype']} (the training default), checkpointing on; `lora16` is the bf16 base (weights and "
          f"compute). The uniform family: every setting bits {{{', '.join(map(str, grid['bits']))}}} × ranks "
          f"{{{', '.join(map(str, grid['ranks']))}}}, `uniform{{bits}}-r{{rank}}`, and at group size "
          f"{{{', '.join(map(str, grid.get('group_sizes', ())))}}} instead of 64 (`-g{{size}}`) the settings the budgets "
          f"compare with: for each budget, group size and bit-width, the largest rank that fits; ◆ marks the best-uniform front (at "
          f"its memory no uniform setting is better); "
          + (f"its settings, `{REFERENCE}`, `{QDORA}` and the searches' plans at the budgets are the mean of "
             f"{settings['seeds']} seeds" if settings.get("seeds_for", "front") == "front"
             else f"the searches' plans at the budgets, `{REFERENCE}`, `{QDORA}` and the best uniform setting within "
                  f"each are "
                  f"the mean of {settings['seeds']} seeds, every other row one seed (seed 0)")
          + f" (± half the max–min spread). Memory is measured on the trained model (weights, quantization metadata and LoRA "
          f"adapters). avg bits counts scales and zeros (uniform 4-bit at group size 64 = 4.5: a bf16 scale and zero per 64 weights); code bits is the plan's mean bit-width. "
          f"`{REFERENCE}` is uniform 4-bit r16 with PEFT's zero start (QLoRA as run today); `{QDORA}` the same with "
          f"DoRA adapters, started as `train` starts them. "
          f"Gap recovered = ({REFERENCE} − method) / ({REFERENCE} − lora16). vs best uniform: the best uniform setting "
          f"that fits the method's budget, and the loss difference. Search steps are the fine-tune steps the "
          f"search spent (searches run as `qradaptor run` runs them: on the first steps of the final fine-tune's "
          f"schedule, in its dtype; a promoted plan continues its cheap run), of which the final fine-tune reuses "
          f"the chosen plan's run (it continues it); × final is the steps it does not reuse, as a multiple of one "
          f"final fine-tune ({settings['steps']} steps); the sensitivity profile is "
          f"shared by the searches and `greedy` and took {settings['profile_seconds']:.0f} s. Peak RSS: the process's "
          f"high-water mark during {settings['rss_steps']} training steps of the plan in a fresh process, reset once the "
          f"model is built (so loading and quantizing do not count; steps after the first allocate nothing new); "
          f"RSS before = that process just before training (runtime, model, data); estimate = `qradaptor train`'s "
          f"training-memory estimate (weights, LoRA gradients, AdamW state, activations; no runtime).\n\n")
    md += markdown_table(["method", "MiB", f"× {REFERENCE}", "code bits", "avg bits", "trainable", "KL before",
                          "test loss", "ppl", f"Δ vs {REFERENCE}", "gap recovered", "vs best uniform", "search steps",
                          "× final", "search s", "train s", "peak RSS MiB", "RSS before MiB", "estimate MiB", "plan"],
                         rows)
    return md + targets_markdown(goals)


def partial_notice(unfinished: list[str], pending: list[str], fewer: dict[str, int], seeds: int) -> str:
    """The paragraph that heads a partial report (``--partial``): what it lacks."""
    parts = [f"searches not finished: {', '.join(unfinished)}" if unfinished else "",
             f"rows whose final is not trained yet: {', '.join(pending)}" if pending else "",
             ("rows that get every seed, with fewer so far: "
              + ", ".join(f"{n} ({k} of {seeds})" for n, k in fewer.items())) if fewer else ""]
    missing = "; ".join(p for p in parts if p) or "nothing: every row and seed is measured"
    return (f"**Partial** (`frontier.py --partial`): what is measured so far of a frontier that runs over several "
            f"sessions; nothing here was trained for this report. Not measured yet: {missing}. A budget's best uniform "
            f"setting is the best of the uniform rows measured so far, and a row with fewer seeds is the mean of "
            f"those it has.\n\n")


def targets_markdown(g: dict) -> str:
    """The results' Targets section, from `targets`."""
    yn = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    md = "\n## Targets\n\n"
    for budget, b in g["budgets"].items():
        if b["best_uniform"] is None:
            md += f"- {budget} budget: no uniform setting fits.\n"
            continue
        md += (f"- {budget} budget: qradaptor {b['loss']:.4f} vs the best uniform setting that fits, {b['best_uniform']} "
               f"{b['best_uniform_loss']:.4f} (seed spreads: qradaptor {b.get('loss_spread', 0.0):.4f}, uniform "
               f"{b['best_uniform_spread']:.4f}): {b['delta']:+.4f} — no worse: {yn(b['no_worse'])}; better by more "
               f"than the larger seed spread: {'yes' if b['better_beyond_spread'] else 'no'}.\n")
    md += (f"- Better than the best uniform setting by more than the larger seed spread at two or more budgets: "
           f"{g['budgets_better_beyond_seed_spread']} — {yn(g['better_beyond_seed_spread_at_two_or_more_budgets'])}.\n"
           f"- Gap between {REFERENCE} and lora16 recovered at the 4-bit budget: "
           + (f"{100 * g['gap_recovered_at_4bit']:.0f}% (target ≥ 50%): {yn(g['gap_recovered_at_least_half'])}.\n"
              if g["gap_recovered_at_4bit"] is not None else "not measured (no 4bit search's final).\n")
           + "- Search cost ≤ 0.5× the final fine-tune (the steps it does not reuse): "
           + ", ".join(f"{k} {v:.2f}×" for k, v in g["search_cost_in_final_fine_tunes"].items())
           + f" — {yn(g['search_cost_at_most_half'])}.\n")
    return md


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    parser.add_argument("--work", default=None, help="resumable working directory (default: benchmarks/work/frontier; "
                                                     "with --smoke a temp dir)")
    parser.add_argument("--seeds-for", choices=("front", "budgets"), default="front",
                        help="which uniform settings get every seed (as the searches' plans do): the whole "
                             "best-uniform front (default), or only the best uniform setting within each budget "
                             "(the targets' comparison; a shorter run)")
    parser.add_argument("--partial", action="store_true",
                        help="report what is measured so far, training nothing and running no search: finished "
                             "searches, finals in the store or the ledger (frontier-partial.{json,md,png}, beside "
                             "the complete frontier's results; for a frontier that spans sessions). A measured row's "
                             "KL and peak RSS are still taken where they are missing")
    parser.add_argument("--first", default="", metavar="ROW[:SEEDS][,...]",
                        help="train these rows before all others, in this order, each with seeds 0 … SEEDS−1 "
                             "(default 1: seed 0): to measure what a decision waits on first in a frontier that spans "
                             "sessions (the rest follow as usual; a row's extra seeds show in the table where the "
                             "row is one that gets every seed)")
    parser.add_argument("--final-run", default=None, help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--rss-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate-run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.final_run:
        return final_run(args.final_run)
    if args.rss_run:
        return rss_run(args.rss_run)
    if args.evaluate_run:
        return evaluate_run(args.evaluate_run)

    from qradaptor.data import load_blocks
    from qradaptor.memory import parse_budget
    from qradaptor.plan import Plan
    from qradaptor.search import Planner, PriorCost, SearchConfig, measured_uniform

    settings = dict(SMOKE if args.smoke else FULL)
    start = time.perf_counter()
    bench = Bench(args.work, smoke=args.smoke)
    model, data, base, tokenizer, L = bench.model, bench.data, bench.base, bench.tokenizer, bench.shapes.num_layers
    settings["profile_seconds"] = bench.profile_seconds

    def searched(name: str, budget: str, **extra) -> tuple[Plan, dict] | None:
        if args.partial and not (bench.work / name / "search" / "plan.json").is_file():  # written once it finished
            unfinished.append(name)
            return None
        result = bench.search(name, budget, **extra)
        kept_runs[name] = result.kept_run
        # the search's own full-fidelity losses (its chosen plan's, and the best uniform setting's that it
        # promoted), to compare its ranking with the final fine-tune's
        uniform = min(measured_uniform(result.points), key=lambda p: p.loss, default=None)
        # the budget as the search priced it: in the fine-tunes' dtype (bf16 scales, zeros and unquantized
        # tensors), as the trained models are measured
        return result.chosen.plan, {**bench.search_cost(name, result), "search_loss": result.chosen.loss,
                                    "search_uniform": uniform.source if uniform else None,
                                    "search_uniform_loss": uniform.loss if uniform else None,
                                    "budget_bytes": result.budget_bytes}

    kept_runs: dict[str, str | None] = {}  # method → its search's run of the chosen plan, which its final continues
    unfinished: list[str] = []  # --partial: searches not finished (their rows are left out)
    pending: list[str] = []  # --partial: rows whose final (seed 0) is not trained yet
    train = not args.partial

    # Every method: its plan and the search that found it (none for the fixed baselines).
    none = {"search_steps": 0, "search_seconds": 0.0, "search_evaluations": 0}
    plans: list[tuple[str, Plan, dict, str]] = [("lora16", Plan.uniform(L, 16, 16), none, "bfloat16")]
    plans.append((REFERENCE, Plan.uniform(L, 4, 16), none, train_dtype()))  # QLoRA today: the zero start
    plans.append((QDORA, Plan.uniform(L, 4, 16, dora=True), none, train_dtype()))
    # quantized plans train as `qradaptor train` does by default (its compute dtype, checkpointing on)
    dtype = settings["dtype"] = train_dtype()
    # the uniform family: every setting a user could pick by hand
    plans += [(uniform_name(b, r), Plan.uniform(L, b, r), none, dtype)
              for b in settings["grid"]["bits"] for r in settings["grid"]["ranks"]]
    budget4 = parse_budget("4bit", bench.shapes, bench.backend)
    config4 = SearchConfig(budget_bytes=budget4, seq_len=settings["seq_len"], **bench.search_settings)
    planner = Planner(bench.shapes, bench.backend, PriorCost(bench.sensitivity, config4), config4)
    plans.append(("greedy", planner.fill(budget4), none, dtype))
    ours = {budget: found for budget in BUDGETS if (found := searched(f"qradaptor-{budget}", budget)) is not None}
    plans += [(uniform_name(b, r, g), Plan.uniform(L, b, r, group_size=g), none, dtype) for b, r, g in
              group_size_settings(bench.shapes, bench.pricing, [cost["budget_bytes"] for _, cost in ours.values()],
                                  settings["grid"])]
    # random search: the 4-bit budget and as many fine-tune steps as ours spent there
    random = None
    if "4bit" in ours:
        random = searched("random", "4bit", **bench.random_settings(ours["4bit"][1]["search_steps"]))
    else:  # --partial: its steps are the 4bit search's
        unfinished.append("random")
    plans += [("random", *random, dtype)] if random else []
    plans += [(f"qradaptor-{budget}", plan, cost, dtype) for budget, (plan, cost) in ours.items()]
    # ablation: the same search over bits only, every adapter at rank 16 (does redistributing bits alone help?)
    bits_only = searched("qradaptor-4bit-r16", "4bit", ranks=(16,))
    plans += [("qradaptor-4bit-r16", *bits_only, dtype)] if bits_only else []
    cache = bench.fitness.cache  # quantized layers the searches made, reused for the KL measurements

    kl_blocks = load_blocks(data, tokenizer, "test", seq_len=settings["seq_len"], max_blocks=settings["kl_blocks"])
    # a fresh checkout: the KL and RSS the committed results measured are not measured again
    committed = {} if args.smoke else committed_rows([RESULTS / "frontier-partial.json", RESULTS / "frontier.json"],
                                                     settings, model, data)
    rows = []
    # The rows the targets compare train first (the budgets' plans with all their seeds, then the 4- and 5-bit
    # uniform settings the budgets fall among), so an interrupted run has measured what matters most; the table
    # keeps the order of ``plans``.
    searched_budgets = {f"qradaptor-{budget}" for budget in BUDGETS}
    asked = first_rows(args.first, [name for name, *_ in plans], settings["seeds"])
    if args.partial:  # the gap's ends first: without them there is no report, so measure nothing else before
        ends = [(name, plan, dtype) for name, plan, _, dtype in plans if name in (REFERENCE, "lora16")]
        if any(run_final(bench.finals, name, plan, recipe(name, settings), model, data, seed=0, dtype=dtype,
                         train=False) is None for name, plan, dtype in ends):
            sys.exit(f"frontier: --partial needs the {REFERENCE} and lora16 finals (the gap's ends), which are not "
                     "trained yet; run benchmarks/frontier.py until they are")
    place = {name: i for i, name in enumerate(asked)}
    first = sorted(range(len(plans)), key=lambda i: (place.get(plans[i][0], len(asked)),
                                                     plans[i][0] not in searched_budgets,
                                                     not plans[i][0].startswith(("uniform4-", "uniform5-")), i))
    for name, plan, cost, dtype in (plans[i] for i in first):
        final = run_final(bench.finals, name, plan, recipe(name, settings), model, data, seed=0, dtype=dtype,
                          init_from=kept_runs.get(name), train=train)
        if final is None:
            pending.append(name)
            continue
        final.pop("run_dir")
        if reuse_measurement(bench.work, committed.get(name, []), name, plan, final, settings, model, data, dtype):
            print(f"frontier: {name}: KL before training and peak RSS from the committed results (the same plan, "
                  "settings and split)", flush=True)
        final.update(measure_rss(bench.work, name, plan, settings, model, data, dtype=dtype))
        # KL before training in fp32 for every method, as the fidelity study and the search's fitness measure it
        kl_path = bench.work / name / "kl-fp32.json"
        if not kl_path.is_file():
            kl_path.parent.mkdir(parents=True, exist_ok=True)
            kl_path.write_text(json.dumps({"kl_before": kl_to_full(base, plan, kl_blocks, cache, None)}))
        rows.append({"name": name, "plan": plan.describe(), "plan_layers": plan.to_dict()["layers"],
                     "code_bits": sum(c.bits for c in plan.layers) / L,  # decoder layers are equal in size
                     "dtype": dtype, **json.loads(kl_path.read_text()), **final, **cost, "seeds": [final["loss"]]})
        print(f"frontier: {name}: test loss {final['loss']:.4f}, {final['memory_bytes'] / 2**20:.1f} MiB", flush=True)
        # always seeded (see `seeded`): their other seeds now, as the loop below would; a row --first asked seeds for
        for seed in range(1, settings["seeds"] if name in searched_budgets else asked.get(name, 1)):
            run_final(bench.finals, f"{name} seed {seed}", plan, recipe(name, settings), model, data, seed=seed,
                      dtype=dtype, train=train)
    order = {name: i for i, (name, *_) in enumerate(plans)}
    rows.sort(key=lambda r: order[r["name"]])

    # More seeds for the searches' plans and the uniform settings on the best-uniform front
    plan_of = {name: plan for name, plan, _, _ in plans}
    settings["seeds_for"] = args.seeds_for
    fill_seeds(rows, args.seeds_for, settings["seeds"], train=train,
               final=lambda row, seed, fine_tune: run_final(
                   bench.finals, f"{row['name']} seed {seed}", plan_of[row["name"]], recipe(row["name"], settings),
                   model, data, seed=seed, dtype=row["dtype"], train=fine_tune))
    methods = rows
    goals = targets(methods, settings["steps"])
    fewer = {r["name"]: len(r["seeds"]) for r in seeded(rows, args.seeds_for) if len(r["seeds"]) < settings["seeds"]}
    payload = {"settings": {**settings, "budgets": list(BUDGETS), "model": model or "smollm2-135m",
                            "data": data or "pydoc-topics", "smoke": args.smoke, "group_size": 64,
                            "partial": args.partial},
               "methods": methods, "best_uniform_front": [r["name"] for r in best_uniform_front(methods)],
               "targets": goals, "seconds": time.perf_counter() - start, "environment": environment()}
    md = report(methods, settings, goals, args.smoke)
    if args.partial:
        payload["not_measured"] = {"searches": unfinished, "finals": pending, "seeds": fewer}
        md = md.replace("\n\n", "\n\n" + partial_notice(unfinished, pending, fewer, settings["seeds"]), 1)
    md += f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    compute = settings["profile_seconds"] + sum(r["search_seconds"] + r["train_seconds"]
                                                + sum(r.get("seed_train_seconds", [])) for r in rows)
    payload["compute_seconds"] = compute
    md += (f"\nTime: {compute / 60:.0f} min in the profile, the searches and the final fine-tunes (measured parts, "
           f"summed; the KL and peak-RSS measurements add a few minutes).\n")
    directory = bench.work if args.smoke else RESULTS  # smoke results measure nothing: they stay out of results/
    name = ("frontier-smoke" if args.smoke else "frontier") + ("-partial" if args.partial else "")
    write_results(name, payload, md, directory=directory)
    if any(m["name"].startswith("qradaptor") for m in methods):  # a partial report may have no search yet
        plot(methods, directory / f"{name}.png")
    print(md)


if __name__ == "__main__":
    main()
