"""Backend benchmark on SmolLM2-135M (group size 64).

For each backend and uniform bit-width 2–8 (every one the backend stores): the KL divergence of the
quantized model's next-token distribution from the full model's on held-out text, the held-out loss, the
relative weight error, bytes (predicted and measured) and measured bytes per decoder-linear weight, and
the time to quantize the whole model. Then, in the same run, the time of one LoRA training step (rank 16
on all 7 projections, AdamW, 4×256 tokens) for every ``hqq`` bit-width, HQQ's own 4-bit layer
(``hqq-native``) and the unquantized model, as the median of interleaved rounds; and the same for a single
quantized linear (forward + backward through LoRA, 1024 tokens) to isolate the layer's own cost.

    .venv/bin/python benchmarks/backends.py [--blocks 8] [--seq-len 256] [--bits 2,3,4,5,6,7,8] [--rounds 5]

Writes benchmarks/results/backends.{json,md}. The shipped SmolLM2 weights were already 4-bit at group
size 32 (GGUF Q4_1); group size 64 keeps 4-bit from looking lossless.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib
    import sys

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402

from qradaptor.backends import BACKENDS, get_backend  # noqa: E402
from qradaptor.data import load_blocks  # noqa: E402
from qradaptor.memory import ModelShapes, measured_bytes, predict  # noqa: E402
from qradaptor.models import load_model, model_fingerprint  # noqa: E402
from qradaptor.plan import Plan  # noqa: E402
from qradaptor.profile import weight_error_terms  # noqa: E402
from qradaptor.quantize import add_adapters, decoder_layers, layer_linears, quantize_model  # noqa: E402

#: The training-step target of issue 9: a 5-bit layer no more than 10% slower than HQQ's own 4-bit layer.
TARGET_RATIO = 1.10


@torch.no_grad()
def log_probs(model, blocks, batch_size: int) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=blocks.input_ids[i : i + batch_size]).logits.float(), dim=-1)
            for i in range(0, len(blocks), batch_size)]


def kl_and_loss(reference: list[torch.Tensor], model, blocks, batch_size: int) -> tuple[float, float]:
    """Mean per-token KL(p_full ‖ p_quant) and the quantized model's mean next-token loss."""
    kl_sum, nll_sum, positions = 0.0, 0.0, 0
    for ref, start in zip(reference, range(0, len(blocks), batch_size)):
        ids = blocks.input_ids[start : start + batch_size]
        with torch.no_grad():
            logq = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        kl_sum += float((ref.exp() * (ref - logq)).sum())
        nll_sum += float(-logq[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        positions += ref.shape[0] * ref.shape[1]
    return kl_sum / positions, nll_sum / (positions - len(blocks))


def weight_error(source, quantized, backend) -> float:
    """Relative squared Frobenius error summed over every decoder-layer linear."""
    terms = [weight_error_terms(src, q, backend)
             for (_, src), (_, q) in zip(decoder_layers(source), decoder_layers(quantized))]
    return sum(e for e, _ in terms) / sum(n for _, n in terms)


def linear_bits_per_weight(model, backend, shapes) -> float:
    """Measured bits per decoder-linear weight: the bytes the quantized modules hold (codes, scales, zeros)."""
    held = sum(backend.held_bytes(m) for m in model.modules() if backend.is_quantized(m))
    return 8 * held / shapes.quantizable_numel


def make_step(model, batch):
    """One LoRA training step (forward, backward, AdamW update) on ``batch``, as a closure."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_layer_step(module, tokens: int, seed: int = 0):
    """Forward + backward of one (quantized) linear wrapped with a rank-16 LoRA adapter, as a closure."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(module.in_features)
            self.proj = module

        def forward(self, x):
            return self.proj(self.norm(x))

    torch.manual_seed(seed)
    net = get_peft_model(Net(), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"], init_lora_weights=False))
    x = torch.randn(tokens, module.in_features, requires_grad=True)  # inputs carry gradients inside a model

    def step() -> None:
        net(x).pow(2).mean().backward()
        net.zero_grad(set_to_none=True)
        x.grad = None

    return step


def interleaved_medians(steps: dict, rounds: int, warmup: int = 1) -> dict[str, dict]:
    """Run every closure once per round, in turn (so load changes on a shared machine hit all of them
    alike), and return each one's median, min and max seconds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "samples": len(t)}
            for name, t in times.items()}


def timing_table(timings: dict, baseline: str, unquantized: str) -> tuple[list, dict]:
    rows, base, full = [], timings[baseline]["median_s"], timings[unquantized]["median_s"]
    for name, t in timings.items():
        rows.append({"config": name, **t, "vs_hqq_native_4bit": t["median_s"] / base,
                     "vs_unquantized": t["median_s"] / full})
    return rows, {"baseline": baseline, "unquantized": unquantized}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8, help="held-out blocks (default 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", default="2,3,4,5,6,7,8")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of the model step")
    parser.add_argument("--layer-rounds", type=int, default=30, help="interleaved timing rounds of the layer step")
    parser.add_argument("--train-batch", type=int, default=4, help="blocks per training step (default 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps timings steady on a shared, loaded machine")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    blocks = load_blocks(None, tokenizer, "validation", seq_len=args.seq_len, max_blocks=args.blocks)
    shapes = ModelShapes.from_model(model)
    reference = log_probs(model, blocks, args.batch_size)
    _, full_loss = kl_and_loss(reference, model, blocks, args.batch_size)

    load_before = os.getloadavg()
    rows, keep = [], {}
    for name in BACKENDS:
        backend = get_backend(name)
        for bits in bits_list:
            if bits not in backend.supported_bits:
                continue
            plan = Plan.uniform(shapes.num_layers, bits, 16, group_size=64)
            start = time.perf_counter()
            quantized = quantize_model(model, plan, backend)
            seconds = time.perf_counter() - start
            kl, loss = kl_and_loss(reference, quantized, blocks, args.batch_size)
            report = predict(shapes, plan, backend)
            measured = measured_bytes(quantized)
            rows.append({
                "backend": name, "bits": bits, "kl": kl, "loss": loss,
                "weight_error": weight_error(model, quantized, backend),
                # Without adapters: predict() includes them, so compare against the measured base + LoRA share.
                "measured_bytes": measured, "predicted_bytes": report.total_bytes - report.lora_bytes,
                "linear_bits_per_weight": report.avg_bits,
                "measured_linear_bits_per_weight": linear_bits_per_weight(quantized, backend, shapes),
                "quantize_seconds": seconds,
            })
            print(f"{name:10s} {bits}-bit: KL {kl:.4f}  loss {loss:.4f}  weight err {rows[-1]['weight_error']:.2e}  "
                  f"{measured / 2**20:.1f} MiB  {rows[-1]['measured_linear_bits_per_weight']:.3f} bits/weight  "
                  f"{seconds:.1f} s", flush=True)
            if name == "hqq" or (name == "hqq-native" and bits == 4):
                keep[f"{name} {bits}-bit"] = (plan, quantized)
            else:
                del quantized

    # ---- training-step time, whole model: every hqq bit-width, hqq-native 4-bit, unquantized (median of rounds)
    baseline, unquantized = "hqq-native 4-bit", "unquantized fp32"
    train_batch = load_blocks(None, tokenizer, "train", seq_len=args.seq_len,
                              max_blocks=args.train_batch).input_ids
    steps = {}
    for key in [baseline] + [k for k in keep if k != baseline]:
        plan, quantized = keep[key]
        steps[key] = make_step(add_adapters(quantized, plan), train_batch)
    full_plan = Plan.uniform(shapes.num_layers, 16, 16, group_size=64)
    steps[unquantized] = make_step(add_adapters(quantize_model(model, full_plan, "hqq"), full_plan), train_batch)
    print(f"timing one LoRA step ({args.train_batch}x{args.seq_len} tokens) of {len(steps)} models, "
          f"{args.rounds} interleaved rounds ...", flush=True)
    model_timings = interleaved_medians(steps, args.rounds)
    model_rows, _ = timing_table(model_timings, baseline, unquantized)
    for r in model_rows:
        print(f"  {r['config']:18s} {r['median_s']:.2f} s  x{r['vs_hqq_native_4bit']:.3f} vs {baseline}  "
              f"x{r['vs_unquantized']:.3f} vs {unquantized}", flush=True)
    del steps, keep

    # ---- training-step time, one linear (layer 0's down_proj, 1536 -> 576), forward + backward through LoRA
    source = dict(layer_linears(decoder_layers(model)[0][1]))["mlp.down_proj"]
    layer_steps = {baseline: make_layer_step(get_backend("hqq-native").quantize(source, 4, 64), 1024)}
    for bits in bits_list:
        layer_steps[f"hqq {bits}-bit"] = make_layer_step(get_backend("hqq").quantize(source, bits, 64), 1024)
    dense = torch.nn.Linear(source.in_features, source.out_features, bias=False)
    dense.weight.data.copy_(source.weight.detach())
    dense.requires_grad_(False)
    layer_steps[unquantized] = make_layer_step(dense, 1024)
    layer_timings = interleaved_medians(layer_steps, args.layer_rounds, warmup=3)
    layer_rows, _ = timing_table(layer_timings, baseline, unquantized)
    for r in layer_rows:
        print(f"  layer {r['config']:18s} {r['median_s'] * 1e3:.1f} ms  x{r['vs_hqq_native_4bit']:.3f} vs {baseline}",
              flush=True)
    load_after = os.getloadavg()

    five = next((r for r in model_rows if r["config"] == "hqq 5-bit"), None)
    five_layer = next((r for r in layer_rows if r["config"] == "hqq 5-bit"), None)
    target = None
    if five is not None:
        target = {"ratio_model_step": five["vs_hqq_native_4bit"], "ratio_layer_step": five_layer["vs_hqq_native_4bit"],
                  "limit": TARGET_RATIO, "met": five["vs_hqq_native_4bit"] <= TARGET_RATIO}

    payload = {
        "settings": {"model": args.model or "smollm2-135m", "model_fingerprint": model_fingerprint(model),
                     "group_size": 64, "held_out_blocks": args.blocks, "seq_len": args.seq_len,
                     "data": "pydoc-topics validation split", "compute_dtype": "float32"},
        "full_precision": {"loss": full_loss, "bytes": measured_bytes(model)},
        "rows": rows,
        "train_step": {"what": f"one LoRA step (rank 16, 7 projections, AdamW) on {args.train_batch}x{args.seq_len} "
                               f"tokens, median of {args.rounds} interleaved rounds after 1 warm-up",
                       "baseline": baseline, "rows": model_rows},
        "layer_step": {"what": f"forward + backward of layer 0's mlp.down_proj (1536->576) with a rank-16 LoRA on "
                               f"1024 tokens, median of {args.layer_rounds} interleaved rounds after 3 warm-ups",
                       "baseline": baseline, "rows": layer_rows},
        "target": target,
        "load_average": {"before": load_before, "after": load_after},
        "environment": environment(),
    }
    md = (f"# Quantizer backends on SmolLM2-135M-Instruct (group size 64)\n\n"
          f"Held-out: {args.blocks}×{args.seq_len} tokens of the default corpus (validation split); "
          f"full-precision loss {full_loss:.4f}, {payload['full_precision']['bytes'] / 2**20:.1f} MiB. "
          f"KL is the mean per-token KL(p_full ‖ p_quant). Bytes are the whole model without adapters "
          f"(embeddings and lm_head stay fp32). Bits/weight counts the scales and zeros (fp32) of the "
          f"decoder linears. The shipped weights were already 4-bit at group size 32 (GGUF Q4_1).\n\n")
    md += markdown_table(
        ["backend", "bits", "KL", "loss", "weight error", "MiB (measured)", "predicted / measured",
         "bits/weight (measured)", "quantize s"],
        [[r["backend"], r["bits"], f"{r['kl']:.4f}", f"{r['loss']:.4f}", f"{r['weight_error']:.2e}",
          f"{r['measured_bytes'] / 2**20:.1f}", f"{r['predicted_bytes'] / r['measured_bytes']:.4f}",
          f"{r['measured_linear_bits_per_weight']:.3f}", f"{r['quantize_seconds']:.1f}"] for r in rows])
    md += (f"\n## Training-step time\n\nOne LoRA step (rank 16 on all 7 projections, AdamW) on {args.train_batch}×"
           f"{args.seq_len} tokens of the training split, whole model; median of {args.rounds} interleaved rounds "
           f"(every configuration once per round) after one warm-up. Ratios are against HQQ's own 4-bit layer "
           f"(`{baseline}`) and the unquantized fp32 model, measured in the same run.\n\n")
    md += markdown_table(
        ["configuration", "median s", "min–max s", f"× {baseline}", "× unquantized"],
        [[r["config"], f"{r['median_s']:.2f}", f"{r['min_s']:.2f}–{r['max_s']:.2f}", f"{r['vs_hqq_native_4bit']:.3f}",
          f"{r['vs_unquantized']:.3f}"] for r in model_rows])
    md += (f"\nOne linear alone (layer 0's `mlp.down_proj`, 1536→576, rank-16 LoRA, 1024 tokens, forward + backward; "
           f"median of {args.layer_rounds} interleaved rounds): the layer's own cost, dequantization included.\n\n")
    md += markdown_table(
        ["configuration", "median ms", "min–max ms", f"× {baseline}", "× unquantized"],
        [[r["config"], f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}",
          f"{r['vs_hqq_native_4bit']:.3f}", f"{r['vs_unquantized']:.3f}"] for r in layer_rows])
    if target is not None:
        verdict = "met" if target["met"] else f"missed by {100 * (target['ratio_model_step'] / TARGET_RATIO - 1):.1f}%"
        md += (f"\n**Target** (issue 9): a 5-bit training step at most {100 * (TARGET_RATIO - 1):.0f}% slower than "
               f"HQQ's own 4-bit layer. Whole-model step: ×{target['ratio_model_step']:.3f} — {verdict}. "
               f"One linear alone: ×{target['ratio_layer_step']:.3f}.\n")
    md += ("\nDifferences smaller than a configuration's min–max spread are noise: on a whole-model step "
           "the decoder linears' dequantization is a small share next to the matmuls and the LM head.\n")
    md += (f"\nTorch threads: {torch.get_num_threads()}. Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
           f"{', '.join(f'{v:.2f}' for v in load_after)} (the machine may be shared; interleaving spreads load "
           f"changes over all configurations alike).\n")
    env = payload["environment"]
    md += f"\nMachine: {env['cpus']} CPUs ({env['processor']}), torch {env['packages']['torch']}, hqq {env['packages']['hqq']}.\n"
    paths = write_results("backends", payload, md)
    print("\n" + md + "\nwritten: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
