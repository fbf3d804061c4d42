"""Training memory: peak RSS of LoRA fine-tuning on a quantized base against plain bf16 / fp32 LoRA, each case
in a fresh process, with the training-memory model's prediction beside every measurement.

    bf16-lora    plain transformers + peft, as a user would write it: bf16 model, LoRA r16 on the 7 projections,
                 `model(input_ids, labels=labels).loss`, AdamW (the baseline of the targets)
    fp32-lora    the same in fp32
    uniform4     qradaptor: uniform 4-bit + r16 on the `hqq` backend (and `-native`: HQQ's own HQQLinear)
    uniform3 / uniform8 / mixed   other plans on `hqq` (mixed: 3/4/5/6/8 bits, ranks 4–32)

Each on SmolLM2-135M (batch 4×256 and 8×512), checkpointing on and off, both compute dtypes for the quantized
plans, and on a random-weight model of a 1B shape (hidden 2048, 16 layers, intermediate 8192) for uniform 4-bit
vs bf16 LoRA. A case's process reports: RSS right after its imports, the whole process's peak, the peak of the
training phase (its high-water mark reset through /proc/self/clear_refs once the model is built), and the mean
time of the steps after the first.

Allocation: qradaptor's cases run as qradaptor does, with PyTorch's huge-page allocation path
(THP_MEM_ALLOC_ENABLE=1, set when qradaptor is imported); the plain LoRA baselines as a user's script would,
with glibc's defaults, and again with the huge-page path (`/huge-pages`) for a same-allocator comparison; the
headline quantized case also with glibc's defaults (`/glibc`), and three cases with glibc returning every freed
block (`/mmap128k`), whose peak is what the live tensors need.

    .venv/bin/python benchmarks/memory.py            # about 40 min on 2 cores
    .venv/bin/python benchmarks/memory.py --smoke    # a tiny random model, seconds: keeps the script working

Resumable: each case's result is kept under --work (default benchmarks/work/memory). Run it on a quiet machine.
Writes benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import (RESULTS, child_result, describe_cpu, environment, markdown_table,  # noqa: E402
                               vm_bytes, write_results)

REPEATS = 3  # runs of the headline pair (see cases)

MIB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The 1B shape of the issue; weights are random (they do not change memory).
SHAPE_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True}
SHAPE_TINY = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": True}
MIXED = [(4, 16), (5, 8), (3, 32), (6, 4), (8, 16), (4, 8)]  # repeated over the layers


def cases(smoke: bool) -> list[dict]:
    """Every case: name, model ('smollm2', '1b' or 'tiny'), method, dtype, checkpointing, batch shape, steps."""
    out = []

    def add(model, method, dtype, ckpt, batch, seq, steps, backend="hqq", allocator=None, backward="no-copy",
            repeats=1):
        default = _default_allocator(method)
        allocator = allocator or default
        name = f"{model}/{method}{'-native' if backend == 'hqq-native' else ''}/{dtype}/" \
               f"{'ckpt' if ckpt else 'no-ckpt'}/{batch}x{seq}" + ("" if allocator == default else f"/{allocator}") \
               + ("" if backward == "no-copy" else f"/{backward}")
        out.append({"name": name, "model": model, "method": method, "backend": backend, "dtype": dtype,
                    "checkpointing": ckpt, "batch_size": batch, "seq_len": seq, "steps": steps,
                    "allocator": allocator, "backward": backward, "repeats": repeats})

    if smoke:
        for method in ("bf16-lora", "uniform4"):
            add("tiny", method, "bfloat16", True, 2, 32, 2, repeats=2 if method == "uniform4" else 1)
        add("tiny", "uniform4", "float32", False, 2, 32, 2)
        return out
    # The headline cases (uniform 4-bit at the default dtype against bf16 LoRA, each allocator) run REPEATS
    # times: the retained heap makes one process's peak vary by ~15% from run to run.
    for ckpt in (True, False):  # SmolLM2, batch 4×256: the plain LoRA baselines and uniform 4-bit, both dtypes
        add("smollm2", "bf16-lora", "bfloat16", ckpt, 4, 256, 4, repeats=REPEATS if ckpt else 1)
        add("smollm2", "fp32-lora", "float32", ckpt, 4, 256, 4)
        for dtype in ("bfloat16", "float32"):
            add("smollm2", "uniform4", dtype, ckpt, 4, 256, 4,
                repeats=REPEATS if ckpt and dtype == _default_dtype_name() else 1)
    add("smollm2", "bf16-lora", "bfloat16", True, 4, 256, 4, allocator="huge-pages", repeats=REPEATS)
    add("smollm2", "uniform4", _default_dtype_name(), True, 4, 256, 4, allocator="glibc", repeats=REPEATS)
    for dtype in ("bfloat16", "float32"):  # other plans and HQQ's own layer, checkpointing on
        add("smollm2", "uniform4", dtype, True, 4, 256, 4, backend="hqq-native")
        add("smollm2", "uniform8", dtype, True, 4, 256, 4)
        add("smollm2", "mixed", dtype, True, 4, 256, 4)
    add("smollm2", "uniform3", "bfloat16", True, 4, 256, 4)
    for dtype in ("bfloat16", "float32"):  # the step time of the backward that kept the dequantized weight
        add("smollm2", "uniform4", dtype, False, 4, 256, 4, backward="saved-weight")
    for method in ("bf16-lora", "uniform4"):  # a larger batch shape
        add("smollm2", method, "bfloat16", True, 8, 512, 3)
    add("smollm2", "bf16-lora", "bfloat16", True, 8, 512, 3, allocator="huge-pages")
    # glibc returning every freed block of 128 KiB or more at once (MALLOC_MMAP_THRESHOLD_=131072): the
    # memory the live tensors need, without the default heap's retained free blocks
    for method, dtype in (("bf16-lora", "bfloat16"), ("uniform4", "bfloat16"), ("uniform4", "float32")):
        add("smollm2", method, dtype, True, 4, 256, 4, allocator="mmap128k")
    for method in ("bf16-lora", "uniform4"):
        add("1b", method, "bfloat16", True, 4, 256, 3, repeats=REPEATS)
    add("1b", "bf16-lora", "bfloat16", True, 4, 256, 3, allocator="huge-pages")
    return out


def _default_allocator(method: str) -> str:
    """Plain LoRA scripts allocate with glibc's defaults; qradaptor turns on PyTorch's huge-page path."""
    return "glibc" if method.endswith("-lora") else "huge-pages"


def _heap_kind(case: dict) -> str:
    """How the case's process allocates, as `qradaptor.device.cpu_allocator` names it (`mmap128k` is glibc's)."""
    return "huge-pages" if case["allocator"] == "huge-pages" else "glibc"


# ---------------------------------------------------------------------------------------- one case (child)


def _plan(method: str, layers: int):
    from qradaptor.plan import LayerChoice, Plan

    if method == "mixed":
        return Plan([LayerChoice(*MIXED[i % len(MIXED)]) for i in range(layers)])
    bits = {"uniform4": 4, "uniform3": 3, "uniform8": 8}.get(method, 16)
    return Plan.uniform(layers, bits, 16)


def model_config(model: str):
    from transformers import LlamaConfig

    from qradaptor.models import default_model_path

    if model == "smollm2":
        return LlamaConfig.from_pretrained(default_model_path())
    return LlamaConfig(**(SHAPE_1B if model == "1b" else SHAPE_TINY))


def predicted(case: dict):
    """The training-memory model's prediction for a case (computed when reporting, so it is always current)."""
    import torch

    from qradaptor.backends import get_backend
    from qradaptor.memory import ModelShapes, training_memory

    config = model_config(case["model"])
    dtype = getattr(torch, case["dtype"])
    plain = case["method"].endswith("-lora")
    backend = None if plain else get_backend(case["backend"], compute_dtype=dtype)
    return training_memory(ModelShapes.from_config(config), _plan(case["method"], config.num_hidden_layers), backend,
                           config, batch_size=case["batch_size"], seq_len=case["seq_len"], dtype=dtype,
                           checkpointing=case["checkpointing"], plain_peft=plain,
                           allocator=_heap_kind(case))


def run_case(case: dict) -> dict:
    """In a fresh process: build the case's model, train a few steps, report memory and time."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS: every case pays for it)
    import peft  # noqa: F401

    import qradaptor  # noqa: F401

    after_imports = vm_bytes("VmRSS")
    from transformers import LlamaForCausalLM

    from qradaptor.models import default_model_path

    dtype = getattr(torch, case["dtype"])
    torch.manual_seed(0)
    config = model_config(case["model"])
    batch, seq = case["batch_size"], case["seq_len"]
    ids = torch.randint(0, config.vocab_size, (max(batch * (case["steps"] + 1), 16), seq),
                        generator=torch.Generator().manual_seed(0))

    def base_model():
        if case["model"] == "smollm2":
            return LlamaForCausalLM.from_pretrained(default_model_path(), dtype=dtype)
        with torch.device("meta"):
            shell = LlamaForCausalLM(config)
        model = shell.to_empty(device="cpu")  # random weights without an fp32 copy first
        # to_empty leaves every tensor uninitialised: the rotary tables too (built anew here), or the loss can be NaN
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
        model.tie_weights()  # to_empty gives each module its own tensor: the output layer again shares the embedding's
        model = model.to(dtype)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
            raise RuntimeError("the random model's output layer does not share the embedding: it would count twice")
        return model

    plan = _plan(case["method"], config.num_hidden_layers)
    start = time.perf_counter()
    if case["method"].endswith("-lora"):
        # Plain transformers + peft, as a user would write it.
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base_model(), LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS)))
        if case["checkpointing"]:
            model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
        backend = None
    else:
        from qradaptor.backends import get_backend
        from qradaptor.quantize import add_adapters, quantize_model

        backend = get_backend(case["backend"], compute_dtype=dtype)
        if case.get("backward") == "saved-weight":  # the layer as it was: F.linear saves the dequantized weight
            import torch.nn.functional as F

            import qradaptor.backends.hqq as hqq_backend

            hqq_backend.dequant_linear = lambda x, module, bias: F.linear(x, module.weight, bias)
        model = add_adapters(quantize_model(base_model(), plan, backend, dtype=dtype, inplace=True), plan)
    build_seconds = time.perf_counter() - start
    import gc

    gc.collect()
    if backend is not None:  # as `qradaptor train` does: what building the model freed goes back to the system
        from qradaptor.memory import release_free_memory

        release_free_memory()
    built_peak = vm_bytes("VmHWM")
    before_training = vm_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS (Linux >= 4.0)
    step_seconds = []
    if backend is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for step in range(case["steps"]):
            t0 = time.perf_counter()
            x = ids[step * batch : (step + 1) * batch]
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - t0)
    else:
        from qradaptor.data import TokenBlocks
        from qradaptor.train import TrainConfig, train

        blocks = TokenBlocks(input_ids=ids, labels=ids.clone())
        # Time each step through the training loop's own per-step hook.
        marks = [time.perf_counter()]
        train(model, blocks, TrainConfig(steps=case["steps"], batch_size=batch, lr=1e-4, warmup_steps=1,
                                         gradient_checkpointing=case["checkpointing"]), progress=False,
              on_step=lambda *a: marks.append(time.perf_counter()))
        step_seconds = [b - a for a, b in zip(marks, marks[1:])]
    train_peak = vm_bytes("VmHWM")
    from qradaptor.device import cpu_allocator

    return {
        "observed_allocator": cpu_allocator(),
        **case,
        "rss_after_imports": after_imports,
        "rss_before_training": before_training,
        "peak_build": built_peak,
        "peak_training": train_peak,
        "peak_process": max(built_peak, train_peak),
        "training_memory": train_peak - after_imports,
        "build_seconds": build_seconds,
        "step_seconds": step_seconds,
        "step_time": sum(step_seconds[1:]) / max(1, len(step_seconds) - 1),
    }


# ---------------------------------------------------------------------------------------- the whole run


def measure(case: dict, work: Path) -> dict:
    """The case's result; for a repeated case, its median run (by training memory) with every run under ``runs``."""
    runs = sorted((_measure_once(case, work, i) for i in range(case.get("repeats", 1))),
                  key=lambda r: r["training_memory"])
    result = dict(runs[len(runs) // 2])
    if len(runs) > 1:
        result["runs"] = [{k: r[k] for k in ("peak_training", "training_memory", "step_time")} for r in runs]
    return result


def _measure_once(case: dict, work: Path, i: int) -> dict:
    path = work / (case["name"].replace("/", "_") + (f"-run{i + 1}" if i else "") + ".json")
    if not path.is_file():
        print(f"memory: {case['name']}" + (f" (run {i + 1} of {case['repeats']})" if case.get("repeats", 1) > 1
                                           else ""), flush=True)
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if _heap_kind(case) == "huge-pages" else "0"}
    if case["allocator"] == "mmap128k":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    result = child_result(path, [str(Path(__file__).resolve()), "--case", json.dumps(case)],
                          f"memory: case {case['name']}", env=env)
    expected = _heap_kind(case)
    if result.get("observed_allocator") != expected:  # the setting did not reach PyTorch: the case is not what it says
        sys.exit(f"memory: case {case['name']} allocated with {result.get('observed_allocator')}, not {expected}")
    return result


def report(results: list[dict], smoke: bool) -> tuple[dict, str]:
    for r in results:
        prediction = predicted(r)
        r["predicted_peak"], r["predicted"] = prediction.peak_bytes, prediction.to_dict()
    by = {r["name"]: r for r in results}

    def ratio(a: str, b: str, key: str = "training_memory"):
        return by[a][key] / by[b][key] if a in by and b in by else None

    rows = []
    for r in results:
        # with an allocator that returns freed memory, the live-tensor prediction is the one to compare
        if r.get("allocator") == "mmap128k":
            r["predicted_peak"] = r["predicted"]["live_peak_bytes"]
        err = r["predicted_peak"] / r["peak_training"] - 1
        spread = (f"{r['runs'][0]['training_memory'] / MIB:.0f}–{r['runs'][-1]['training_memory'] / MIB:.0f}"
                  if r.get("runs") else "")
        rows.append([r["name"], f"{r['peak_process'] / MIB:.0f}", f"{r['peak_training'] / MIB:.0f}",
                     f"{r['rss_after_imports'] / MIB:.0f}", f"{r['training_memory'] / MIB:.0f}", spread,
                     f"{r['predicted_peak'] / MIB:.0f}", f"{err:+.1%}", f"{r['step_time']:.2f}"])
    worst = max(abs(r["predicted_peak"] / r["peak_training"] - 1) for r in results)
    if smoke:
        targets = {}
    else:
        s, b = "smollm2/uniform4/{}/ckpt/4x256", "smollm2/bf16-lora/bfloat16/ckpt/4x256"
        default_dtype = _default_dtype_name()

        def pairings(a: str, b: str) -> dict:
            """The best and worst pairing of two repeated cases' runs."""
            runs_a, runs_b = by.get(a, {}).get("runs"), by.get(b, {}).get("runs")
            if not (runs_a and runs_b):
                return {"min": None, "max": None}
            return {"min": runs_a[0]["training_memory"] / runs_b[-1]["training_memory"],
                    "max": runs_a[-1]["training_memory"] / runs_b[0]["training_memory"]}

        small = pairings(s.format(default_dtype), b)
        large = pairings("1b/uniform4/bfloat16/ckpt/4x256", "1b/bf16-lora/bfloat16/ckpt/4x256")
        targets = {
            "smollm2_uniform4_vs_bf16_lora": ratio(s.format(default_dtype), b),
            # the same comparison with both on PyTorch's huge-page path
            "smollm2_uniform4_vs_bf16_lora_same_allocator": ratio(s.format(default_dtype), b + "/huge-pages"),
            "smollm2_uniform4_vs_bf16_lora_min": small["min"],
            "smollm2_uniform4_vs_bf16_lora_max": small["max"],
            "1b_uniform4_vs_bf16_lora": ratio("1b/uniform4/bfloat16/ckpt/4x256", "1b/bf16-lora/bfloat16/ckpt/4x256"),
            "1b_uniform4_vs_bf16_lora_min": large["min"],
            "1b_uniform4_vs_bf16_lora_max": large["max"],
            "1b_uniform4_vs_bf16_lora_same_allocator": ratio("1b/uniform4/bfloat16/ckpt/4x256",
                                                             "1b/bf16-lora/bfloat16/ckpt/4x256/huge-pages"),
            # qradaptor's allocation setting against glibc's defaults, uniform 4-bit
            "huge_pages_memory_saving_uniform4": ratio(s.format(default_dtype), s.format(default_dtype) + "/glibc"),
            "huge_pages_step_time_uniform4": ratio(s.format(default_dtype), s.format(default_dtype) + "/glibc",
                                                   "step_time"),
            "checkpointing_memory_saving_uniform4": ratio(s.format(default_dtype),
                                                          s.format(default_dtype).replace("/ckpt/", "/no-ckpt/")),
            "checkpointing_step_time_cost_uniform4": ratio(s.format(default_dtype),
                                                           s.format(default_dtype).replace("/ckpt/", "/no-ckpt/"),
                                                           "step_time"),
            **{f"no_copy_backward_step_time_{d}": ratio(f"smollm2/uniform4/{d}/no-ckpt/4x256",
                                                        f"smollm2/uniform4/{d}/no-ckpt/4x256/saved-weight", "step_time")
               for d in ("bfloat16", "float32")},
            "bf16_vs_fp32_step_time_uniform4": ratio(s.format("bfloat16"), s.format("float32"), "step_time"),
            "worst_prediction_error": worst,
        }
    env = environment()
    payload = {"cases": results, "targets": targets, "environment": env}
    md = ["# Training memory", "", f"CPU: {describe_cpu(env)}.", "",
          "Each case in a fresh process (`benchmarks/memory.py`): peak RSS of the whole process, peak of the training "
          "phase (high-water mark reset once the model is built), RSS right after the imports (torch, transformers, "
          "peft, qradaptor), training memory = training peak − RSS after imports, the training-memory model's "
          "predicted peak (`qradaptor memory --batch-size B --seq-len S`) and its error against the training peak, "
          "and the mean time of the steps after the first. `bf16-lora`/`fp32-lora`: plain transformers + peft "
          "(`model(input_ids, labels=labels).loss`); the rest: qradaptor's training loop (chunked loss) on the "
          "quantized base. Names: model / method / compute dtype / checkpointing / batch×tokens [/ allocator]. "
          "Allocation: qradaptor's cases as qradaptor runs, on PyTorch's huge-page path (`THP_MEM_ALLOC_ENABLE=1`, "
          "set when qradaptor is imported); the plain LoRA cases as a user's script runs, with glibc's defaults; "
          "a name ending in `/huge-pages` or `/glibc` ran with the other one. `mmap128k`: glibc's defaults with "
          "`MALLOC_MMAP_THRESHOLD_=131072`, so glibc returns every freed block of 128 KiB or more at once: its peak "
          "is what the live tensors need, and it is compared with the model's live peak (without "
          "`ALLOCATOR_RETENTION`); every other case is compared with the full prediction for its allocator. "
          "A case with a range ran several times in fresh processes: its row is the median run "
          "(by training memory), the range is over all its runs, and the `_min`/`_max` ratios pair those runs "
          "best and worst.", "",
          markdown_table(["case", "peak process MiB", "peak training MiB", "after imports MiB", "training memory MiB",
                          "range MiB", "predicted MiB", "prediction error", "step s"], rows)]
    if targets:
        md += ["## Ratios", ""] + [f"- {k}: {v:.3f}" if v is not None else f"- {k}: not measured"
                                   for k, v in targets.items()] + [""]
    return payload, "\n".join(md)


def _default_dtype_name() -> str:
    """What `qradaptor train` computes in by default on this CPU."""
    from qradaptor.precision import default_dtype

    return default_dtype("cpu").dtype


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script, not memory")
    parser.add_argument("--work", type=Path, default=None, help="where each case's result is kept (resumable)")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this (or one of "
                                                     "several, comma-separated); results/ is not written")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    work = args.work or Path(__file__).resolve().parent / "work" / ("memory-smoke" if args.smoke else "memory")
    only = args.only.split(",") if args.only else None
    selected = [c for c in cases(args.smoke) if only is None or any(part in c["name"] for part in only)]
    results = [measure(c, work) for c in selected]
    payload, md = report(results, args.smoke)
    if args.only is None:
        where = work if args.smoke else RESULTS
        write_results("memory", payload, md, where)
        print(f"memory: wrote {where}/memory.json and memory.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
