"""Training step time by compute dtype on this CPU as it is, and in fp32-only mode: oneDNN capped at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``), where PyTorch computes bf16 matmuls with the fallback a CPU without native bf16 gets
(an AMD EPYC Zen 3, AVX2 only, took ~99 s a step in bf16 against ~4.5 s in fp32).

Each case in a fresh process, through memory.py's `run_case` (SmolLM2-135M, uniform 4-bit + LoRA r16 on `hqq`,
batches of 4×128 tokens, gradient checkpointing on, the training loop's own per-step hook; step time = mean of the
steps after the first; training memory = the training phase's peak RSS − RSS after the imports):

    float32, bfloat16     the two compute dtypes
    auto                  what ``--dtype auto`` (the default) resolves to there; the one-off cost of deciding,
                          with an empty probe cache, is reported beside it
    bf16-fp32-products    the alternative: bf16 weights, scales and activations, every matrix product (linears,
                          matmuls, forward and backward) computed in fp32 and cast back to bf16

    .venv/bin/python benchmarks/cpu_dtype.py            # about 25 min on 2 cores (the bf16 fallback is slow)
    .venv/bin/python benchmarks/cpu_dtype.py --smoke    # a tiny random model, seconds: keeps the script working

Resumable (per-case results under --work, default benchmarks/work/cpu_dtype). Run it on a quiet machine.
Writes benchmarks/results/cpu_dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import (RESULTS, child_result, describe_cpu, environment, markdown_table,  # noqa: E402
                               write_results)

MODES = {"native": {}, "fp32-only": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
VARIANTS = ("float32", "bfloat16", "auto", "bf16-fp32-products")
STEPS = 3
#: Runs of the cases that compute alike (float32 and auto where auto is float32, bfloat16 and auto where it is
#: bfloat16): one process's step time varies by ~10% from run to run, as much as what is compared.
REPEATS = 3
MIB = 2**20


def fp32_products():
    """A dispatch mode in which every matrix product of bf16 tensors (``mm``, ``addmm``, ``bmm``, ``baddbmm``: what
    linears, matmuls and their backward run as) is computed in fp32 and cast back to bf16. It sits below autograd, so
    backward's products and checkpointing's recomputation go through it too; it counts the products it upcast."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    aten = torch.ops.aten
    products = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}

    def up(a):
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a

    def down(a):
        return a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a

    class Fp32Products(TorchDispatchMode):
        upcast = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket in products and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                                                       for a in args):
                Fp32Products.upcast += 1
                return tree_map(down, func(*tree_map(up, args), **tree_map(up, kwargs)))
            return func(*args, **kwargs)

    return Fp32Products()


def run_variant(spec: dict) -> dict:
    """In a fresh process (the mode's environment already set): one variant's `run_case`."""
    from benchmarks.memory import run_case

    variant, extra = spec["variant"], {}
    if variant == "auto":
        from qradaptor import precision

        with tempfile.TemporaryDirectory() as empty:  # an empty probe cache: the one-off cost of deciding
            os.environ["QRADAPTOR_CACHE"], kept = empty, os.environ.get("QRADAPTOR_CACHE")
            start = time.perf_counter()
            choice = precision.default_dtype("cpu")
            extra = {"decide_seconds": time.perf_counter() - start, "reason": choice.reason}
            if kept is None:
                os.environ.pop("QRADAPTOR_CACHE")
            else:
                os.environ["QRADAPTOR_CACHE"] = kept
        dtype = choice.dtype
    else:
        dtype = "bfloat16" if variant == "bf16-fp32-products" else variant
    case = {"name": f"{spec['mode']}/{variant}", "model": spec["model"], "method": "uniform4", "backend": "hqq",
            "dtype": dtype, "checkpointing": True, "batch_size": 4, "seq_len": spec["seq_len"], "steps": STEPS,
            "allocator": "huge-pages", "backward": "no-copy"}
    mode = fp32_products() if variant == "bf16-fp32-products" else contextlib.nullcontext()
    with mode:
        result = run_case(case)
    if variant == "bf16-fp32-products":
        extra["products_upcast"] = type(mode).upcast
    return {**result, **spec, **extra}


def _median(runs: list[dict]) -> dict:
    """A case's median run by step time, with every run's step time under ``runs`` when it ran more than once."""
    ordered = sorted(runs, key=lambda r: r["step_time"])
    result = dict(ordered[len(ordered) // 2])
    if len(runs) > 1:
        result["runs"] = [{k: r[k] for k in ("step_time", "step_seconds", "training_memory")} for r in runs]
    return result


def report(results: list[dict], env: dict, smoke: bool) -> tuple[dict, str]:
    rows, by = [], {(r["mode"], r["variant"]): r for r in results}
    for r in results:
        fp32 = by[(r["mode"], "float32")]["step_time"]
        r["vs_float32"] = r["step_time"] / fp32
        spread = (f" ({min(x['step_time'] for x in r['runs']):.2f}–{max(x['step_time'] for x in r['runs']):.2f})"
                  if "runs" in r else "")
        rows.append([r["mode"], r["variant"], r["dtype"], f"{r['step_time']:.2f}{spread}", f"{r['vs_float32']:.2f}",
                     f"{r['training_memory'] / MIB:.0f}",
                     f"{r['decide_seconds']:.2f}" if "decide_seconds" in r else ""])
    targets = {
        "fp32_only_auto_vs_float32": by[("fp32-only", "auto")]["vs_float32"],
        "native_auto_dtype": by[("native", "auto")]["dtype"],
        "fp32_only_products_vs_float32": by[("fp32-only", "bf16-fp32-products")]["vs_float32"],
    }
    autos = "; ".join(f"{m}: {by[(m, 'auto')]['reason']}" for m in MODES)
    md = "\n".join([
        "# Compute dtype and CPU: training step time", "",
        f"CPU: {describe_cpu(env)}. `benchmarks/cpu_dtype.py`: each case in a fresh process, "
        f"{'a tiny random model' if smoke else 'SmolLM2-135M'}, uniform 4-bit (`hqq`, group 64) + LoRA r16, batches of "
        f"4×{results[0]['seq_len']} tokens, gradient checkpointing on, {STEPS} steps; step time = mean of the steps "
        "after the first; a case with a range ran "
        f"{len(next(r['runs'] for r in results if 'runs' in r))} times in fresh processes, alternating with the "
        "others of its mode: the median run, and the range. "
        "`fp32-only`: the same CPU with `ONEDNN_MAX_CPU_ISA=AVX2`, where bf16 matmuls take "
        "PyTorch's fallback, as on a CPU without native bf16 (AVX2 only). `auto`: the default, `--dtype auto`; "
        "decide s: its one-off cost with an empty probe cache. `bf16-fp32-products`: bf16 storage and activations, "
        "every product computed in fp32 and cast back. Training memory: the training phase's peak RSS − RSS after "
        "the imports.", "",
        markdown_table(["mode", "variant", "computes in", "step s", "× float32", "training memory MiB",
                        "decide s"], rows),
        f"What `auto` chose: {autos}.", "",
        f"- fp32-only mode: the default's step is {targets['fp32_only_auto_vs_float32']:.2f}× float32's "
        "(target ≤ 1.1); "
        f"bf16 storage with fp32 products {targets['fp32_only_products_vs_float32']:.2f}× "
        f"({by[('fp32-only', 'bf16-fp32-products')]['products_upcast']} products upcast); bfloat16 itself "
        f"{by[('fp32-only', 'bfloat16')]['vs_float32']:.1f}×.",
        f"- native: the default computes in {targets['native_auto_dtype']} "
        f"({by[('native', 'auto')]['vs_float32']:.2f}× float32's step).", ""])
    payload = {"smoke": smoke, "steps": STEPS, "cases": results, "targets": targets, "environment": env}
    return payload, md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script, not the CPU")
    parser.add_argument("--work", type=Path, default=None, help="where each case's result is kept (resumable)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_variant(json.loads(args.case))))
        return 0
    work = args.work or Path(__file__).resolve().parent / "work" / ("cpu_dtype-smoke" if args.smoke else "cpu_dtype")
    results = []
    for mode, env in MODES.items():
        runs, repeated = {}, set(VARIANTS)
        # the repeated cases alternate, so a slow spell of the machine hits them alike
        # (the smoke run repeats in the last mode only: it checks the repeating, not the CPU)
        for i in range(REPEATS if not args.smoke else 2 if mode == list(MODES)[-1] else 1):
            for variant in VARIANTS:
                if variant not in repeated:
                    continue
                spec = {"mode": mode, "variant": variant, "model": "tiny" if args.smoke else "smollm2",
                        "seq_len": 32 if args.smoke else 128}
                path = work / (f"{mode}-{variant}" + (f"-run{i + 1}" if i else "") + ".json")
                if not path.is_file():
                    print(f"cpu_dtype: {mode} / {variant}" + (f" (run {i + 1})" if i else ""), flush=True)
                child_env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1", **env}
                child_env.pop("QRADAPTOR_DTYPE", None)  # auto decides by the CPU here, whatever the caller pinned
                runs.setdefault(variant, []).append(child_result(
                    path, [str(Path(__file__).resolve()), "--case", json.dumps(spec)],
                    f"cpu_dtype: {mode} / {variant}", env=child_env))
            # repeated: auto and the dtype it computes in, and float32 (the yardstick)
            repeated = {"auto", "float32", runs["auto"][0]["dtype"]}
        for variant in VARIANTS:
            results.append(_median(runs[variant]))
    payload, md = report(results, environment(), args.smoke)
    where = work if args.smoke else RESULTS
    write_results("cpu_dtype", payload, md, where)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
