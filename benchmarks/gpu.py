"""The GPU check: on a CUDA GPU, training memory, step time and quantization time of a random-weight model of a
1B shape (hidden 2048, 16 layers, intermediate 8192), batch 4×1024 tokens, each case in a fresh process.

    bf16-lora        plain transformers + peft, as a user would write it (bf16 model on the GPU, LoRA r16 on the
                     7 projections, `model(input_ids, labels=labels).loss`, AdamW): the baseline
    uniform4         qradaptor: uniform 4-bit + r16 on the `hqq` backend (packed codes, dequantized per layer)
    uniform4-native  the same on `hqq-native` (HQQ's own HQQLinear and its kernels)
    mixed            qradaptor: 3/4/5/6-bit layers in turn, ranks 8/16/32/16, on `hqq`

each with gradient checkpointing on and off. A case reports the peak memory PyTorch allocated on the GPU while
training (`torch.cuda.max_memory_allocated`, reset once the model is built), the weights' allocation after the
build, the mean step time after the first step, the time to quantize (the bf16 model in host memory, each linear
moved to the GPU and quantized there), and the training-memory model's prediction. Targets (issue 17): uniform
4-bit peak ≤ 0.4× bf16 LoRA's; step time of uniform 4-bit ≤ 1.5× bf16 LoRA's, of the mixed plan ≤ 1.1× uniform
4-bit's; quantizing ≤ 60 s.

    python benchmarks/gpu.py                          # on a CUDA machine: writes benchmarks/results/gpu.{json,md}
    python benchmarks/gpu.py --smoke --device cpu     # a tiny model on the CPU, seconds: keeps the script working

Resumable: each case's result is kept under --work (default benchmarks/work/gpu). The CPU smoke run's cases run in
its own process, one after another (no peak on a GPU to keep apart), and are not kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, child_result, environment, markdown_table, write_results  # noqa: E402

MIB = 2**20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPE_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True}
SHAPE_TINY = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": True}
MIXED = [(3, 8), (4, 16), (5, 32), (6, 16)]  # repeated over the layers
METHODS = ("bf16-lora", "uniform4", "uniform4-native", "mixed")


def cases(smoke: bool) -> list[dict]:
    batch, seq, steps = (2, 32, 3) if smoke else (4, 1024, 6)
    return [{"name": f"{method}/{'ckpt' if ckpt else 'no-ckpt'}", "method": method, "checkpointing": ckpt,
             "shape": "tiny" if smoke else "1b", "batch_size": batch, "seq_len": seq, "steps": steps}
            for method in METHODS for ckpt in (True, False)]


def _plan(method: str, layers: int):
    from qradaptor.plan import LayerChoice, Plan

    if method == "mixed":
        return Plan([LayerChoice(*MIXED[i % len(MIXED)]) for i in range(layers)])
    return Plan.uniform(layers, 16 if method == "bf16-lora" else 4, 16)


def _config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**(SHAPE_1B if shape == "1b" else SHAPE_TINY))


def _random_model(config, device, dtype):
    """A model of ``config``'s shape with random weights, built without an fp32 copy first."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shell = LlamaForCausalLM(config)
    model = shell.to_empty(device=device)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)  # real tables
    model.tie_weights()  # to_empty gives each module its own tensor: the output layer again shares the embedding's
    from qradaptor.models import convert_weights

    convert_weights(model, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: dict, device_name: str) -> dict:
    """In a fresh process: build the case's model on the device, train a few steps, report memory and time."""
    import torch

    from qradaptor.backends import get_backend
    from qradaptor.device import PeakMemory, resolve_device
    from qradaptor.memory import ModelShapes, training_memory

    device = resolve_device(device_name)
    dtype = torch.bfloat16
    config = _config(case["shape"])
    batch, seq, steps = case["batch_size"], case["seq_len"], case["steps"]
    plan = _plan(case["method"], config.num_hidden_layers)
    ids = torch.randint(0, config.vocab_size, (batch * steps, seq), generator=torch.Generator().manual_seed(0))
    plain = case["method"] == "bf16-lora"
    backend = None if plain else get_backend("hqq-native" if case["method"].endswith("native") else "hqq",
                                             compute_dtype=dtype)
    quantize_seconds = None
    if plain:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(_random_model(config, device, dtype),
                               LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS)))
        if case["checkpointing"]:
            model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        from qradaptor.quantize import add_adapters, quantize_model

        base = _random_model(config, torch.device("cpu"), dtype)  # in host memory, as `train` loads it
        _sync(device)
        start = time.perf_counter()
        quantized = quantize_model(base, plan, backend, dtype=dtype, inplace=True, device=device)
        _sync(device)
        quantize_seconds = time.perf_counter() - start
        model = add_adapters(quantized, plan)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    peak = PeakMemory(device).start()
    step_seconds = []
    if plain:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for step in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            x = ids[step * batch : (step + 1) * batch].to(device)
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            step_seconds.append(time.perf_counter() - t0)
    else:
        from qradaptor.data import TokenBlocks
        from qradaptor.train import TrainConfig, train

        marks = [time.perf_counter()]

        def mark(*_):
            _sync(device)
            marks.append(time.perf_counter())

        train(model, TokenBlocks(input_ids=ids, labels=ids.clone()),
              TrainConfig(steps=steps, batch_size=batch, lr=1e-4, warmup_steps=1,
                          gradient_checkpointing=case["checkpointing"]), progress=False, on_step=mark)
        step_seconds = [b - a for a, b in zip(marks, marks[1:])]
    predicted = training_memory(ModelShapes.from_config(config), plan, backend, config, batch_size=batch,
                                seq_len=seq, dtype=dtype, checkpointing=case["checkpointing"], plain_peft=plain,
                                device=device)
    return {**case, "device": str(device), "device_name": _device_name(device), "peak_bytes": peak.bytes(),
            "peak_what": peak.describe(), "weights_bytes": weights, "predicted_peak_bytes": predicted.peak_bytes,
            "quantize_seconds": quantize_seconds, "step_seconds": step_seconds,
            "step_time": sum(step_seconds[1:]) / max(1, len(step_seconds) - 1)}


def _device_name(device) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def measure(case: dict, work: Path, device: str) -> dict:
    path = work / (case["name"].replace("/", "_") + ".json")
    if not path.is_file():
        print(f"gpu: {case['name']}", flush=True)
    return child_result(path, [str(Path(__file__).resolve()), "--case", json.dumps(case), "--device", device],
                        f"gpu: case {case['name']}")


def report(results: list[dict], smoke: bool) -> tuple[dict, str]:
    by = {r["name"]: r for r in results}

    def ratio(a: str, b: str, key: str):
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        return None if not x or not y else round(x / y, 3)

    ratios = {
        "peak_uniform4_over_bf16_lora": ratio("uniform4/ckpt", "bf16-lora/ckpt", "peak_bytes"),
        "peak_uniform4_over_bf16_lora_no_ckpt": ratio("uniform4/no-ckpt", "bf16-lora/no-ckpt", "peak_bytes"),
        "step_uniform4_over_bf16_lora": ratio("uniform4/ckpt", "bf16-lora/ckpt", "step_time"),
        "step_mixed_over_uniform4": ratio("mixed/ckpt", "uniform4/ckpt", "step_time"),
        "step_native_over_uniform4": ratio("uniform4-native/ckpt", "uniform4/ckpt", "step_time"),
        "quantize_seconds_uniform4": by.get("uniform4/ckpt", {}).get("quantize_seconds"),
    }
    targets = {"peak_uniform4_over_bf16_lora": 0.4, "step_uniform4_over_bf16_lora": 1.5,
               "step_mixed_over_uniform4": 1.1, "quantize_seconds_uniform4": 60}
    device = results[0]["device_name"] if results else "?"
    payload = {"smoke": smoke, "device": device, "environment": environment(), "ratios": ratios,
               "targets": targets, "cases": results}
    rows = [[r["name"], f"{r['peak_bytes'] / MIB:.0f}" if r["peak_bytes"] else "—",
             f"{r['predicted_peak_bytes'] / MIB:.0f}",
             f"{r['weights_bytes'] / MIB:.0f}" if r["weights_bytes"] is not None else "—",
             f"{r['step_time']:.3f}", "—" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.1f}"]
            for r in results]
    md = (f"# GPU check{' (smoke)' if smoke else ''}: {device}\n\n"
          f"Random-weight model, shape {results[0]['shape'] if results else '?'}, batch "
          f"{results[0]['batch_size'] if results else '?'}×{results[0]['seq_len'] if results else '?'}, bf16. "
          f"Peak: {results[0]['peak_what'] if results else ''} while training (reset after the build).\n\n"
          + markdown_table(["case", "peak (MiB)", "predicted (MiB)", "weights (MiB)", "step (s)", "quantize (s)"],
                           rows)
          + "\n" + markdown_table(["ratio", "value", "target"],
                                  [[k, v, targets.get(k, "")] for k, v in ratios.items()]))
    return payload, md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model: checks the script, not the GPU")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N; cpu only with --smoke")
    parser.add_argument("--work", type=Path, default=None, help="where each case's result is kept (resumable)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), args.device)))
        return 0
    from qradaptor.device import resolve_device

    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        sys.exit("gpu: this check needs a CUDA GPU (PyTorch sees none); `--smoke --device cpu` runs a tiny version")
    work = args.work or Path(__file__).resolve().parent / "work" / ("gpu-smoke" if args.smoke else "gpu")
    if device.type == "cpu":
        # The fresh process per case is there for a GPU's peak (allocator state, CUDA context); the CPU smoke run
        # checks the script, and a child's start (~6 s of imports) costs more than its case: run them here.
        results = [run_case(c, str(device)) for c in cases(args.smoke)]
    else:
        results = [measure(c, work, str(device)) for c in cases(args.smoke)]
    payload, md = report(results, args.smoke)
    where = work if args.smoke else RESULTS
    write_results("gpu", payload, md, where)
    print(f"gpu: wrote {where}/gpu.json and gpu.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
