"""Backend benchmark on SmolLM2-135M (group size 64): for each backend and uniform bit-width, the KL
divergence of the quantized model's next-token distribution from the full model's on held-out text,
the relative weight error, bytes (predicted and measured), and the time to quantize the whole model.

    .venv/bin/python benchmarks/backends.py [--blocks 8] [--seq-len 256] [--bits 2,3,4,8]

Writes benchmarks/results/backends.{json,md}. The shipped SmolLM2 weights were already 4-bit at group
size 32 (GGUF Q4_1); group size 64 keeps 4-bit from looking lossless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, write_results  # noqa: E402

from qradaptor.backends import BACKENDS, get_backend  # noqa: E402
from qradaptor.data import load_blocks  # noqa: E402
from qradaptor.memory import ModelShapes, measured_bytes, predict  # noqa: E402
from qradaptor.models import load_model, model_fingerprint  # noqa: E402
from qradaptor.plan import Plan  # noqa: E402
from qradaptor.quantize import decoder_layers, layer_linears, quantize_model  # noqa: E402


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
    err = norm = 0.0
    for (_, src_layer), (_, q_layer) in zip(decoder_layers(source), decoder_layers(quantized)):
        q_modules = dict(q_layer.named_modules())
        for name, lin in layer_linears(src_layer):
            w = lin.weight.detach().float()
            err += float((backend.dequantize(q_modules[name]).float() - w).pow(2).sum())
            norm += float(w.pow(2).sum())
    return err / norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8, help="held-out blocks (default 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]

    model, tokenizer = load_model(args.model)
    blocks = load_blocks(None, tokenizer, "validation", seq_len=args.seq_len, max_blocks=args.blocks)
    shapes = ModelShapes.from_model(model)
    reference = log_probs(model, blocks, args.batch_size)
    _, full_loss = kl_and_loss(reference, model, blocks, args.batch_size)

    rows = []
    for name in BACKENDS:
        backend = get_backend(name)
        for bits in bits_list:
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
                "linear_bits_per_weight": report.avg_bits, "quantize_seconds": seconds,
            })
            print(f"{name:9s} {bits}-bit: KL {kl:.4f}  loss {loss:.4f}  weight err {rows[-1]['weight_error']:.2e}  "
                  f"{measured / 2**20:.1f} MiB  {seconds:.1f} s", flush=True)
            del quantized

    payload = {
        "settings": {"model": args.model or "smollm2-135m", "model_fingerprint": model_fingerprint(model),
                     "group_size": 64, "held_out_blocks": args.blocks, "seq_len": args.seq_len,
                     "data": "pydoc-topics validation split", "compute_dtype": "float32"},
        "full_precision": {"loss": full_loss, "bytes": measured_bytes(model)},
        "rows": rows,
        "environment": environment(),
    }
    md = (f"# Quantizer backends on SmolLM2-135M-Instruct (group size 64)\n\n"
          f"Held-out: {args.blocks}×{args.seq_len} tokens of the default corpus (validation split); "
          f"full-precision loss {full_loss:.4f}, {payload['full_precision']['bytes'] / 2**20:.1f} MiB. "
          f"KL is the mean per-token KL(p_full ‖ p_quant). Bytes are the whole model without adapters "
          f"(embeddings and lm_head stay fp32). Bits/weight counts the scales and zeros (fp32) of the "
          f"decoder linears. The shipped weights were already 4-bit at group size 32 (GGUF Q4_1).\n\n")
    md += markdown_table(
        ["backend", "bits", "KL", "loss", "weight error", "MiB (measured)", "predicted / measured", "bits/weight", "quantize s"],
        [[r["backend"], r["bits"], f"{r['kl']:.4f}", f"{r['loss']:.4f}", f"{r['weight_error']:.2e}",
          f"{r['measured_bytes'] / 2**20:.1f}", f"{r['predicted_bytes'] / r['measured_bytes']:.4f}",
          f"{r['linear_bits_per_weight']:.2f}", f"{r['quantize_seconds']:.1f}"] for r in rows])
    env = payload["environment"]
    md += f"\nMachine: {env['cpus']} CPUs ({env['processor']}), torch {env['packages']['torch']}, hqq {env['packages']['hqq']}.\n"
    paths = write_results("backends", payload, md)
    print("\n" + md + "\nwritten: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
