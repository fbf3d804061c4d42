"""Is the adapter start's lead a learning-rate effect? (issue #29: the start beats 16-bit LoRA at 100 steps)

At the frontier's recipe (100 steps of 4×128, lr 3e-4) uniform 4-bit r16 with the activation start ends below
16-bit LoRA r16 (results/adapter_init.md). Measured (results/learning_rate.md, `factor_scales`): the start's ``A``
maps the layers' inputs to 1.7–5.4× larger values than PEFT's random ``A`` does, and its ``B`` is not zero. Under Adam,
which moves each weight by about the learning rate whatever its gradient, a step then changes the adapter's
output several times more: the start also raises the adapters' effective learning rate. If the zero start only
lacks that, a larger learning rate gives it (and 16-bit LoRA) the same lead. So the rows the 4-bit target compares,
at several learning rates, one seed:

    lora16          LoRA r16 on the unquantized base (this CPU's training dtype; the frontier's is bf16)
    qlora4-r16      uniform 4-bit r16, PEFT's zero start: QLoRA as run today
    start           uniform 4-bit r16 with the adapter start `train` uses by default

Gap recovered = (qlora4-r16 − start) / (qlora4-r16 − lora16), at each learning rate and with every row at its
best learning rate.

    .venv/bin/python benchmarks/learning_rate.py                 # SmolLM2: one final per row and rate, resumable
    # (~5 min each in bf16 on 2 cores with native bf16; in float32 on an AVX2-only EPYC, 22 min: lora16 took 1,298 s)
    .venv/bin/python benchmarks/learning_rate.py --smoke         # a tiny random model: the script runs

Finals go to the frontier's store and ledger (benchmarks/work/finals, results/finals.json): the learning rate is
part of their key. Writes benchmarks/results/learning_rate.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402
from benchmarks.frontier import (FINALS, FULL, REFERENCE, SMOKE, children_in_process, gap_recovered,  # noqa: E402
                                 recipe, run_final, train_dtype)

ROWS = (REFERENCE, "start", "lora16")  # in this order: the ceiling last, it answers the least
LEARNING_RATES = (3e-4, 1e-3)
SCALE_LAYERS = (3, 15, 27)  # the layers whose factor scales are reported (early, middle, late on SmolLM2)
SCALE_TOKENS = 1024


def factor_scales(base, blocks, layers, *, rank: int = 16, bits: int = 4) -> list[dict]:
    """Per linear of ``layers``: the RMS of ``A x`` (x: the linear's inputs on ``blocks``) for PEFT's random ``A``
    and for the ``svd`` and ``activation`` starts' ``A``, and the mean column norm of their ``B`` (PEFT's scaling
    divided out, as `apply_start` sets them): how much more a step of Adam moves each start's adapter output."""
    import torch

    from qradaptor.adapter_init import AdapterStart
    from qradaptor.backends import QuantCache, get_backend
    from qradaptor.plan import Plan
    from qradaptor.quantize import add_adapters, quantize_model

    plan = Plan.uniform(len(base.model.layers), bits, rank)
    cache = QuantCache(get_backend("hqq", compute_dtype=next(base.parameters()).dtype))
    fits = {m: AdapterStart(base, m, cache, blocks=blocks, max_rank=rank).factors(plan) for m in ("svd", "activation")}
    wanted = {f"model.layers.{i}." for i in layers}
    inputs = {}

    def keep(name, args):
        inputs.setdefault(name, args[0].detach().flatten(0, -2))  # returns nothing: a pre-hook's return replaces args

    hooks = [module.register_forward_pre_hook(lambda m, a, n=name: keep(n, a))
             for name, module in base.named_modules()
             if isinstance(module, torch.nn.Linear) and any(name.startswith(w) for w in wanted)]
    try:
        with torch.no_grad():
            base.model(input_ids=blocks.input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    from peft.tuners.lora import LoraLayer

    peft_model = add_adapters(quantize_model(base, plan, cache=cache), plan, seed=0).get_base_model()
    rows = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or name not in inputs:
            continue
        x, root = inputs[name].float(), math.sqrt(float(module.scaling["default"]))
        zero = module.lora_A["default"].weight.detach().float()
        row = {"module": name.removeprefix("model."), "zero_ax": float((x @ zero.T).pow(2).mean().sqrt())}
        for method, fitted in fits.items():
            A, B = fitted[name].A / root, fitted[name].B / root
            row[f"{method}_ax"] = float((x @ A.T).pow(2).mean().sqrt())
            row[f"{method}_b"] = float(B.norm(dim=0).mean())
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LEARNING_RATES),
                        help="the learning rates, comma-separated (default %(default)s; 3e-4 is the frontier's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="every row's training dtype (default: `train`'s on this CPU); pinning it lets a machine "
                             "with another default continue the same finals")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny settings: checks the script runs")
    parser.add_argument("--work", default=None, help="with --smoke: where its model, finals and results go (default: "
                                                     "a temp dir)")
    args = parser.parse_args(argv)
    try:
        lrs = list(dict.fromkeys(float(x) for x in args.lrs.split(",")))  # in the order given: trained so
    except ValueError:
        parser.error(f"--lrs takes numbers separated by commas, not {args.lrs!r}")
    began = time.perf_counter()
    import torch

    from qradaptor.adapter_init import calibration_subset
    from qradaptor.data import load_blocks
    from qradaptor.models import load_model
    from qradaptor.plan import Plan

    settings = {k: v for k, v in (SMOKE if args.smoke else FULL).items() if k not in ("grid", "search")}
    work = Path(args.work or tempfile.mkdtemp(prefix="qradaptor-lr-")) if args.smoke else None
    model = data = None
    store = FINALS
    if args.smoke:
        from benchmarks.search import smoke_model

        children_in_process()
        model, data = smoke_model(work)
        store = work / "finals"
    dtype = args.dtype or train_dtype()
    base, tokenizer = load_model(model, dtype=getattr(torch, dtype))
    L = len(base.model.layers)
    blocks = calibration_subset(load_blocks(data, tokenizer, "train", seq_len=settings["seq_len"], model=base),
                                64 if args.smoke else SCALE_TOKENS)
    scales = factor_scales(base, blocks, [i for i in SCALE_LAYERS if i < L] or [0])
    del base
    plans = {"lora16": Plan.uniform(L, 16, 16), REFERENCE: Plan.uniform(L, 4, 16), "start": Plan.uniform(L, 4, 16)}
    rows = []
    for lr in lrs:
        for name in ROWS:
            row_settings = recipe(name, {**settings, "lr": lr})  # the reference starts at zero, the others as `train`
            label = name if lr == FULL["lr"] else f"{name} lr {lr:g}"
            final = run_final(store, label, plans[name], row_settings, model, data, seed=0, dtype=dtype)
            rows.append({"name": name, "lr": lr, "plan": plans[name].describe(), "dtype": dtype,
                         "adapter_init": row_settings["adapter_init"], "loss": final["loss"],
                         "final_train_loss": final.get("final_train_loss"), "memory_bytes": final["memory_bytes"],
                         "train_seconds": final["train_seconds"]})
            print(f"learning_rate: {name} at lr {lr:g}: {final['loss']:.4f}", flush=True)
    summary = summarise(rows, lrs)
    payload = {"settings": {**settings, "lrs": lrs, "dtype": dtype, "smoke": args.smoke,
                            "model": model or "smollm2-135m", "data": data or "pydoc-topics",
                            "scale_layers": SCALE_LAYERS, "scale_tokens": int(blocks.input_ids.numel())},
               "rows": rows, "summary": summary, "factor_scales": scales, "seconds": time.perf_counter() - began,
               "environment": environment()}
    md = report(payload) + f"\nCPU: {describe_cpu(payload['environment'])}.\n"
    write_results("learning_rate-smoke" if args.smoke else "learning_rate", payload, md,
                  directory=work if args.smoke else RESULTS)  # smoke results measure nothing: they stay out of results/
    print(md)
    return 0


def summarise(rows: list[dict], lrs: list[float]) -> dict:
    """The gap recovered by ``start`` at each learning rate, and with every row at its own best learning rate."""
    loss = {(r["name"], r["lr"]): r["loss"] for r in rows}
    at = {f"{lr:g}": gap_recovered(loss[REFERENCE, lr], loss["start", lr], loss["lora16", lr]) for lr in lrs}
    best = {name: min(lrs, key=lambda lr: loss[name, lr]) for name in ROWS}
    tuned = gap_recovered(loss[REFERENCE, best[REFERENCE]], loss["start", best["start"]], loss["lora16", best["lora16"]])
    return {"recovered_at": at, "best_lr": best, "recovered_tuned": tuned,
            "best_loss": {name: loss[name, best[name]] for name in ROWS}}


def percent(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def report(payload: dict) -> str:
    s, rows, summary = payload["settings"], payload["rows"], payload["summary"]
    title = "a tiny random model (smoke)" if s["smoke"] else "SmolLM2-135M-Instruct"
    table = [[r["name"], f"{r['lr']:g}", r["plan"],
              "zero (no quantization error to fit)" if r["name"] == "lora16" else r["adapter_init"], f"{r['loss']:.4f}",
              percent(summary["recovered_at"][f"{r['lr']:g}"]) if r["name"] == "start" else "",
              f"{r['train_seconds']:.0f}"] for r in rows]
    scales = [[r["module"], f"{r['zero_ax']:.3f}", f"{r['svd_ax']:.3f}", f"{r['activation_ax']:.3f}",
               f"{r['activation_ax'] / r['zero_ax']:.1f}×", f"{r['svd_b']:.3f}", f"{r['activation_b']:.3f}"]
              for r in payload["factor_scales"]]
    best = summary["best_lr"]
    lines = [f"- Each row at its best learning rate here: " + ", ".join(
        f"{name} {best[name]:g} ({summary['best_loss'][name]:.4f})" for name in ROWS)
        + f"; the start then recovers {percent(summary['recovered_tuned'])} of the gap.",
        "- At each learning rate: " + ", ".join(f"lr {lr}: {percent(v)}" for lr, v in summary["recovered_at"].items())
        + "."]
    return (f"# The adapter start and the learning rate on {title}\n\n"
            f"One seed (0), {s['steps']} LoRA steps of {s['batch_size']}×{s['seq_len']} tokens, {s['dtype']} "
            f"(every row, the unquantized `lora16` base too), held-out loss on the whole test split. `{REFERENCE}`: "
            f"uniform 4-bit r16 with PEFT's zero start; `start`: the same plan started as `train` starts adapters "
            f"by default (`{s['adapter_init']}`). Gap recovered = ({REFERENCE} − start) / ({REFERENCE} − lora16), "
            "at the same learning rate. Seconds: the final's training.\n\n"
            + markdown_table(["row", "lr", "plan", "start", "test loss", "gap recovered", "s"], table) + "\n"
            + "\n".join(lines) + "\n\n"
            f"## How far a step moves each start's adapter\n\nRMS of `A x` over {s['scale_tokens']} training tokens' "
            "inputs to each linear (PEFT's scaling divided out, as the adapters hold them), for PEFT's random `A` "
            "(zero start, B = 0) and the fitted starts; mean column norm of `B`. Adam moves each weight by about "
            "the learning rate, so a step of `B` changes the output in proportion to `A x`, and a step of `A` in "
            "proportion to `B`.\n\n"
            + markdown_table(["module", "zero A x", "svd A x", "activation A x", "activation / zero", "svd B",
                              "activation B"], scales))


if __name__ == "__main__":
    sys.exit(main())
