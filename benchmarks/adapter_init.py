"""Quantization-aware adapter starts compared (issue #29 item 3), on SmolLM2-135M-Instruct with the default data.

For each plan and each start (qradaptor.adapter_init: ``zero`` = PEFT's B = 0, ``svd`` = rank-r SVD of the
quantization error (LoftQ, one iteration), ``loftq`` = LoftQ's alternation (5 iterations; new codes, same bytes),
``activation`` = the fit weighted by the calibration inputs' second moment): the start's seconds, the KL to the
full model and the test loss at step 0, then the test loss after the frontier's fine-tune (100 steps of 4×128,
lr 3e-4, the training dtype of this CPU, checkpointing on), seeds as asked. The same recipe as
benchmarks/frontier.py's finals, so its ``zero`` rows reproduce the frontier's figures.

    .venv/bin/python benchmarks/adapter_init.py                 # SmolLM2, ~4 min per case on 2 cores, resumable
    .venv/bin/python benchmarks/adapter_init.py --smoke         # tiny random model, seconds: keeps the script working

Each case's result is kept in --work (default benchmarks/work/adapter_init); rerunning skips finished cases.
Writes benchmarks/results/adapter_init.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402

METHODS = ("zero", "svd", "loftq", "activation")
QLORA = "qlora4-r16"  # the frontier's uniform 4-bit r16 with PEFT's zero start: the gap's reference, QLoRA as run today
FULL = {"steps": 100, "seq_len": 128, "batch_size": 4, "lr": 3e-4, "kl_blocks": 16, "calibration_tokens": 4096,
        "loftq_iterations": 5}
SMOKE = {"steps": 3, "seq_len": 32, "batch_size": 2, "lr": 3e-4, "kl_blocks": 2, "calibration_tokens": 128,
         "loftq_iterations": 2}


def frontier_plan(name: str):
    """A plan the committed frontier chose (its ``plan_layers``), or None when the frontier has no such method."""
    from qradaptor.plan import Plan

    path = RESULTS / "frontier.json"
    if not path.is_file():
        return None
    row = next((m for m in json.loads(path.read_text())["methods"] if m["name"] == name), None)
    return None if row is None else Plan.from_dict({"layers": row["plan_layers"]})


def from_ledger(plan, seed: int, settings: dict, method: str) -> dict | None:
    """The frontier's final fine-tune of ``plan`` with the start ``method`` (its finals ledger, committed), or None.
    The frontier trains the ``zero`` and ``activation`` starts with the same recipe as a case here (`train_plan`,
    which fits the activation start on the same calibration tokens), so their seeds beyond 0 are not trained again;
    seed 0 always is (it measures the start itself, and checks that it reproduces the ledger's)."""
    from benchmarks.frontier import FINALS, final_key, final_spec, held_out_current, ledger_path, read_ledger
    from qradaptor.rundir import DEFAULT_START_TOKENS

    if method not in ("zero", "activation") or settings["calibration_tokens"] != DEFAULT_START_TOKENS:  # train's
        return None
    spec = final_spec(plan, {**settings, "adapter_init": method}, None, None, seed=seed, dtype=settings["dtype"])
    kept = read_ledger(ledger_path(FINALS)).get(final_key(spec))
    if kept is None or not held_out_current(kept["result"], spec):  # judged on other held-out text: train it here
        return None
    return {"loss": kept["result"]["loss"], "train_seconds": kept["result"]["train_seconds"], "from_frontier": True}


def run_case(base, plan, method: str, seed: int, settings: dict, data: dict, cache) -> dict:
    """Quantize ``plan``, start its adapters with ``method``, measure, fine-tune, measure again."""
    from benchmarks.frontier import kl_to
    from qradaptor.adapter_init import AdapterStart, apply_start, calibration_subset, loftq_start
    from qradaptor.evaluate import evaluate_loss
    from qradaptor.quantize import add_adapters, quantize_model, set_child
    from qradaptor.train import TrainConfig, train

    start = time.perf_counter()
    quantized = quantize_model(base, plan, cache=cache)
    quantize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if method == "loftq":
        fitted = loftq_start(base, plan, cache.backend, iterations=settings["loftq_iterations"])
        for name, (module, _) in fitted.items():
            set_child(quantized, name, module)
        factors = {name: fit for name, (_, fit) in fitted.items()}
    else:
        starter = AdapterStart(base, method, cache, blocks=calibration_subset(data["train"],
                                                                               settings["calibration_tokens"]),
                               max_rank=max(plan.ranks))
        factors = starter.factors(plan)
    model = add_adapters(quantized, plan, seed=seed)
    apply_start(model, factors)
    start_seconds = time.perf_counter() - start
    model.eval()
    kl0 = kl_to(base, model, data["kl"])
    loss0 = evaluate_loss(model, data["test"], progress=False).loss
    config = TrainConfig(steps=settings["steps"], batch_size=settings["batch_size"], lr=settings["lr"], seed=seed)
    result = train(model, data["train"], config, progress=False)
    loss = evaluate_loss(model, data["test"], progress=False).loss
    return {"start_seconds": start_seconds, "quantize_seconds": quantize_seconds, "kl_before": kl0,
            "loss_before": loss0, "loss": loss, "train_seconds": result.seconds, "final_train_loss": result.final_loss}


def same_seeds(losses: list[float] | None, n: int) -> float:
    """The mean of the first ``n`` seeds' losses (a row's difference is taken over the seeds it ran)."""
    return sum(losses[:n]) / n if losses and len(losses) >= n else float("nan")


def report(rows: list[dict], settings: dict, reference: dict) -> str:
    headers = ["plan", "start", "seeds", "start s", "KL step 0", "test loss step 0", "test loss", "Δ vs zero (same seeds)",
               "gap recovered", "train s"]
    zero = {r["plan"]: r["seeds"] for r in rows if r["method"] == "zero"}
    gap = reference.get(QLORA, float("nan")) - reference.get("lora16", float("nan"))
    body = []
    for r in rows:
        recovered = (reference.get(QLORA, float("nan")) - r["loss"]) / gap if gap == gap else float("nan")
        spread = f" ± {r['spread'] / 2:.4f}" if len(r["seeds"]) > 1 else ""
        body.append([r["plan"], r["method"], len(r["seeds"]), f"{r['start_seconds']:.1f}", f"{r['kl_before']:.4f}",
                     f"{r['loss_before']:.4f}", f"{r['loss']:.4f}{spread}",
                     f"{r['loss'] - same_seeds(zero.get(r['plan']), len(r['seeds'])):+.4f}", f"{recovered:.0%}",
                     f"{r['train_seconds']:.0f}"])
    md = ("# Adapter starts at the 4-bit budget\n\nSmolLM2-135M-Instruct, default data; each plan quantized by HQQ "
          f"(group 64), adapters started as named, then {settings['steps']} LoRA steps of {settings['batch_size']}×"
          f"{settings['seq_len']} tokens (lr {settings['lr']}, {settings['dtype']}, checkpointing), test loss on the "
          f"whole test split; start s: attaching the adapters and fitting them. Seeds beyond 0 of the zero and "
          f"activation starts come from the frontier's finals ledger where it has them (the same recipe: seed 0, "
          f"trained here, is checked against it below). KL at step 0: to the full model ({settings['dtype']}), {settings['kl_blocks']} test "
          f"blocks. activation: {settings['calibration_tokens']} calibration tokens from the training split; loftq: "
          f"{settings['loftq_iterations']} alternations (it rewrites the codes). Gap recovered: from uniform 4-bit r16 "
          f"with the zero start (QLoRA as run today, {QLORA}) to lora16, as frontier.json measured them (the mean of the seeds each ran there: "
          f"{reference.get(QLORA, float('nan')):.4f} → {reference.get('lora16', float('nan')):.4f}). "
          "Loss ± half the seeds' max–min spread.\n\n")
    checks = [f"{r['plan']} {r['method']}: {r['seeds'][0]:.4f} here, {r['frontier_seed0']:.4f} in the ledger"
              for r in rows if r.get("frontier_seed0") is not None]
    checked = ("\nSeed 0 against the frontier's final of the same settings: " + "; ".join(checks) + ".\n"
               if checks else "\n")
    return md + markdown_table(headers, body) + checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the starts in --seeded (default 3)")
    parser.add_argument("--seeded", default="zero,activation",
                        help="the starts that get every seed (the others run seed 0)")
    parser.add_argument("--plans", default="uniform4-r16,greedy,uniform4-r16-dora",
                        help="uniform4-r16, uniform4-r16-dora (QDoRA) and/or frontier methods whose plans to use "
                             "(comma-separated; default: greedy, the profile's fill of the 4-bit budget, is a plan "
                             "with mixed ranks)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--plan-seeds", default="uniform4-r16-dora=1,greedy=1",
                        help="seeds for particular plans, as PLAN=N,... (default: one seed for QDoRA and greedy)")
    parser.add_argument("--compare-on", default="uniform4-r16",
                        help="the plans every start in --methods runs on; the others run only the starts in --seeded")
    args = parser.parse_args()

    import torch

    from benchmarks.frontier import held_out_fingerprint
    from qradaptor.backends import QuantCache, get_backend
    from qradaptor.data import load_blocks
    from qradaptor.io import atomic_write_json
    from qradaptor.models import load_model
    from qradaptor.plan import Plan
    from qradaptor.precision import default_dtype

    settings = dict(SMOKE if args.smoke else FULL)
    work = Path(args.work or (tempfile.mkdtemp(prefix="qradaptor-init-") if args.smoke
                              else Path(__file__).resolve().parent / "work" / "adapter_init"))
    work.mkdir(parents=True, exist_ok=True)
    model_spec = data_spec = None
    if args.smoke:
        from benchmarks.search import smoke_model

        model_spec, data_spec = smoke_model(work)
    settings["dtype"] = dtype = "float32" if args.smoke else default_dtype("cpu").dtype
    base, tokenizer = load_model(model_spec, dtype=getattr(torch, dtype))
    data = {"train": load_blocks(data_spec, tokenizer, "train", seq_len=settings["seq_len"], model=base),
            "test": load_blocks(data_spec, tokenizer, "test", seq_len=settings["seq_len"], model=base)}
    data["kl"] = data["test"].subset(settings["kl_blocks"])
    cache = QuantCache(get_backend("hqq", compute_dtype=getattr(torch, dtype)))
    held_out = held_out_fingerprint(data_spec, settings["seq_len"])  # a kept case judged on other text is run again
    num_layers = len(base.model.layers)
    plans = {}
    for name in args.plans.split(","):
        if name in ("uniform4-r16", "uniform4-r16-dora") or args.smoke:  # the latter: QDoRA (DoRA on 4-bit HQQ)
            plan = Plan.uniform(num_layers, 4, 16, dora=name.endswith("-dora"))
        else:
            plan = frontier_plan(name)
        if plan is None:
            sys.exit(f"adapter_init: no plan named {name} in results/frontier.json")
        plans[name] = plan
    rows = []
    for plan_name, plan in plans.items():
        for method in args.methods.split(","):
            if plan_name not in args.compare_on.split(",") and method not in args.seeded.split(","):
                continue
            runs = []
            seeds = dict(item.split("=") for item in args.plan_seeds.split(",") if item).get(plan_name, args.seeds)
            for seed in range(int(seeds) if method in args.seeded.split(",") else 1):
                path = work / f"{plan_name}-{method}-s{seed}.json"
                kept = from_ledger(plan, seed, settings, method) if seed and not args.smoke else None
                if kept is not None:
                    runs.append(kept)
                    continue
                kept = json.loads(path.read_text()) if path.is_file() else None
                if kept is None or kept.get("held_out") != held_out:  # none, or judged on other held-out text
                    print(f"adapter_init: {plan_name} {method} seed {seed}", flush=True)
                    kept = {**run_case(base, plan, method, seed, settings, data, cache), "held_out": held_out}
                    atomic_write_json(path, kept)
                runs.append(kept)
            losses = [r["loss"] for r in runs]
            ledger_seed0 = None if args.smoke else from_ledger(plan, 0, settings, method)
            row = {"plan": plan_name, "method": method, "seeds": losses, "loss": sum(losses) / len(losses),
                   "spread": max(losses) - min(losses), **{k: v for k, v in runs[0].items() if k != "loss"},
                   "seeds_from_frontier": sum(1 for r in runs if r.get("from_frontier")),
                   "frontier_seed0": None if ledger_seed0 is None else ledger_seed0["loss"]}
            rows.append(row)
            print(f"adapter_init: {plan_name} {method}: step 0 {row['loss_before']:.4f}, after {row['loss']:.4f}",
                  flush=True)
    frontier = json.loads((RESULTS / "frontier.json").read_text()) if (RESULTS / "frontier.json").is_file() else {}
    reference = {m["name"]: m["loss"] for m in frontier.get("methods", []) if m["name"] in (QLORA, "lora16")}
    if QLORA not in reference:  # no committed frontier (the smoke run): this table's own zero row
        reference[QLORA] = next((r["loss"] for r in rows if r["method"] == "zero"), float("nan"))
    payload = {"settings": settings, "rows": rows, "reference": reference, "environment": environment()}
    md = report(rows, settings, reference) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    write_results("adapter_init-smoke" if args.smoke else "adapter_init", payload, md,
                  directory=work if args.smoke else RESULTS)
    print(md)


if __name__ == "__main__":
    main()
