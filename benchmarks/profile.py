"""Profiler benchmark on SmolLM2-135M (group size 64, 30 layers × {2,3,4}, 32×256 calibration tokens).

Measured in one run:
- the naive method: for each probe, quantize one layer in a copy of the model (no cache) and run the full
  model forward, exact KL against the reference. Timed on a few layers × all bits and extrapolated to the
  whole profile (per-probe cost does not depend on the layer);
- ours: the full profile (cached layer inputs, compact top-k reference, quantization cache), in each
  requested compute dtype; agreement between dtypes;
- stability: Spearman correlation of the per-layer KL ranking at the lowest bit-width between two
  disjoint halves of the calibration set;
- additivity: over random mixed plans, Spearman correlation between the sum of per-layer KLs and the
  measured KL of the whole mixed model.

    .venv/bin/python benchmarks/profile.py [--dtypes float32,bfloat16] [--naive-layers 0,15,29]

Writes benchmarks/results/profile.{json,md} and sensitivity heatmaps. Targets: full profile ≤ 25% of the
naive time and under 6 minutes on 2 cores; stability ≥ 0.9; additivity ≥ 0.8.
"""

from __future__ import annotations

import argparse
import copy
import time

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib
    import sys

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import RESULTS, environment, markdown_table, write_results  # noqa: E402
from qradaptor.models import load_model, model_fingerprint  # noqa: E402
from qradaptor.plan import LayerChoice, Plan  # noqa: E402
from qradaptor.profile import (ProfileSettings, additivity, calibration_blocks, plot_heatmap,  # noqa: E402
                               profile_model, stability)
from qradaptor.quantize import quantize_model  # noqa: E402

TARGETS = {"time_ratio": 0.25, "seconds": 360, "stability": 0.9, "additivity": 0.8}


def naive_seconds(model, blocks, layers: list[int], bits: list[int], batch_size: int, group_size: int) -> dict:
    """Time the naive probe (quantize one layer in a fresh copy, full forward, exact KL) on a few layers."""
    n = model.config.num_hidden_layers
    with torch.no_grad():
        reference = [F.log_softmax(model(input_ids=blocks.input_ids[i : i + batch_size]).logits, -1)
                     for i in range(0, len(blocks), batch_size)]
    times, kls = [], {}
    for layer in layers:
        for b in bits:
            start = time.perf_counter()
            plan_bits = [16] * n
            plan_bits[layer] = b
            quantized = quantize_model(model, Plan([LayerChoice(x, 1) for x in plan_bits], group_size=group_size), "hqq")
            total, count = 0.0, 0
            with torch.no_grad():
                for ref, i in zip(reference, range(0, len(blocks), batch_size)):
                    logq = F.log_softmax(quantized(input_ids=blocks.input_ids[i : i + batch_size]).logits, -1)
                    total += float((ref.exp() * (ref - logq)).sum())
                    count += ref.shape[0] * ref.shape[1]
            times.append(time.perf_counter() - start)
            kls[f"{layer}:{b}"] = total / count
            del quantized
            print(f"naive probe layer {layer} {b}-bit: {times[-1]:.1f} s, KL {kls[f'{layer}:{b}']:.4f}", flush=True)
    per_probe = sum(times) / len(times)
    return {"probes_timed": len(times), "seconds_per_probe": per_probe, "kl": kls,
            "extrapolated_seconds": per_probe * n * len(bits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32 * 256)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of our profile, first = validated")
    parser.add_argument("--naive-layers", default="0,15,29")
    parser.add_argument("--additivity-plans", type=int, default=20)
    parser.add_argument("--additivity-bits", default="2,3,4,8;3,4,8", help="';'-separated bit sets to draw from")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    bits = [int(b) for b in args.bits.split(",")]
    dtypes = args.dtypes.split(",")

    model, tokenizer = load_model(args.model)
    base = ProfileSettings(bits=tuple(bits), tokens=args.tokens, group_size=64)
    blocks = calibration_blocks(tokenizer, base)
    print(f"calibration: {len(blocks)}×{blocks.input_ids.shape[1]} tokens", flush=True)

    naive = naive_seconds(model, blocks, [int(x) for x in args.naive_layers.split(",")], bits, base.batch_size, 64)

    ours = {}
    for dtype in dtypes:
        s = ProfileSettings(**{**base.__dict__, "dtype": dtype})
        result = profile_model(model, tokenizer, s, blocks=blocks, use_cache=False, progress=True)
        plot_heatmap(result, RESULTS / f"sensitivity-{dtype}.png")
        ours[dtype] = result
        print(f"ours ({dtype}): {result.seconds:.0f} s = {result.seconds / naive['extrapolated_seconds']:.1%} of naive",
              flush=True)

    main_dtype = dtypes[0]
    main_result = ours[main_dtype]
    # Our probes against the naive ones on the timed layers (same exact KL, different route).
    agreement = {k: {"naive": v, "ours": main_result.kl[int(k.split(":")[0])][int(k.split(":")[1])]}
                 for k, v in naive["kl"].items()}

    settings = ProfileSettings(**{**base.__dict__, "dtype": main_dtype})
    work = model if main_dtype == "float32" else copy.deepcopy(model).to(settings.torch_dtype)
    start = time.perf_counter()
    stable = stability(work, settings, blocks, progress=True)
    stable["seconds"] = time.perf_counter() - start
    print(f"stability: Spearman {stable['spearman']:.3f}", flush=True)
    adds = {}
    for bit_set in args.additivity_bits.split(";"):
        choices = tuple(int(b) for b in bit_set.split(","))
        start = time.perf_counter()
        adds[bit_set] = additivity(work, main_result, settings, blocks, plans=args.additivity_plans,
                                   bits_choices=choices, progress=True)
        adds[bit_set]["seconds"] = time.perf_counter() - start
        print(f"additivity over {{{bit_set}}}: Spearman {adds[bit_set]['spearman']:.3f}", flush=True)

    dtype_agreement = {}
    if len(dtypes) > 1:
        from scipy.stats import spearmanr

        low = min(bits)
        for dtype in dtypes[1:]:
            a = [main_result.kl[l][low] for l in range(main_result.layers)]
            c = [ours[dtype].kl[l][low] for l in range(main_result.layers)]
            dtype_agreement[dtype] = {
                "spearman_at_lowest_bits": float(spearmanr(a, c).statistic),
                "max_relative_difference": max(abs(x - y) / x for x, y in zip(a, c)),
            }

    payload = {
        "settings": {**base.to_dict(), "model": args.model or "smollm2-135m", "model_fingerprint": model_fingerprint(model),
                     "calibration_tokens": int(blocks.input_ids.numel()), "naive_layers": args.naive_layers,
                     "validated_dtype": main_dtype, "additivity_plans": args.additivity_plans},
        "naive": naive,
        "ours": {d: {"seconds": r.seconds, "ratio_to_naive": r.seconds / naive["extrapolated_seconds"],
                     "kl": r.to_dict()["kl"], "kl_uniform": r.to_dict()["kl_uniform"],
                     "reference_storage": r.reference_storage}
                 for d, r in ours.items()},
        "naive_vs_ours_kl": agreement,
        "dtype_agreement": dtype_agreement,
        "stability": stable,
        "additivity": adds,
        "targets": TARGETS,
        "environment": environment(),
    }
    write_results("profile", payload, render_markdown(payload))
    print((RESULTS / "profile.md").read_text())


def verdict(ok: bool, text: str) -> str:
    return ("met" if ok else "MISSED") + f" ({text})"


def render_markdown(p: dict) -> str:
    s, naive = p["settings"], p["naive"]
    lines = [
        "# Sensitivity profiler on SmolLM2-135M-Instruct",
        "",
        f"{s['calibration_tokens']} calibration tokens ({s['tokens'] // s['seq_len']}×{s['seq_len']}, training split), "
        f"group size 64, bits {s['bits']}, HQQ backend; reference kept as {next(iter(p['ours'].values()))['reference_storage']}. "
        "The shipped weights were already 4-bit at group size 32 (GGUF Q4_1).",
        "",
        f"Naive method (quantize one layer in a copy, full forward, exact KL; fp32): timed on layers "
        f"{s['naive_layers']} × all bits ({naive['probes_timed']} probes, {naive['seconds_per_probe']:.1f} s each) and "
        f"extrapolated to {len(p['ours'][s['validated_dtype']]['kl'])} layers × {len(s['bits'])} bits = "
        f"{naive['extrapolated_seconds']:.0f} s.",
        "",
    ]
    rows = [[d, f"{r['seconds']:.0f}", f"{r['ratio_to_naive']:.1%}",
             verdict(r["ratio_to_naive"] <= TARGETS["time_ratio"], f"≤ 25%: {r['ratio_to_naive'] / TARGETS['time_ratio']:.2f}× the allowance"),
             verdict(r["seconds"] <= TARGETS["seconds"], f"≤ 360 s: {r['seconds'] / TARGETS['seconds']:.2f}× the allowance")]
            for d, r in p["ours"].items()]
    lines.append(markdown_table(["compute dtype", "our profile (s)", "of naive", "time target", "6-minute target"], rows))
    st = p["stability"]
    lines.append(f"**Stability** (Spearman of the per-layer KL at {st['bits']} bits, two disjoint halves of the "
                 f"calibration set, {s['validated_dtype']}): {st['spearman']:.3f} — {verdict(st['spearman'] >= 0.9, '≥ 0.9')}.")
    lines.append("")
    for bit_set, a in p["additivity"].items():
        lines.append(f"**Additivity** ({a['plans']} random plans, bits drawn from {{{bit_set}}}; Spearman of summed "
                     f"per-layer KL vs measured whole-model KL): {a['spearman']:.3f} — {verdict(a['spearman'] >= 0.8, '≥ 0.8')}. "
                     f"Measured/summed KL ratio: median {sorted(m / x for m, x in zip(a['measured'], a['predicted']))[a['plans'] // 2]:.2f}.")
        lines.append("")
    if p["dtype_agreement"]:
        for d, agree in p["dtype_agreement"].items():
            lines.append(f"bf16 vs fp32 profile ({d}): Spearman {agree['spearman_at_lowest_bits']:.3f} at the lowest bits, "
                         f"max relative difference {agree['max_relative_difference']:.1%}.")
        lines.append("")
    diffs = [abs(v["naive"] - v["ours"]) / v["naive"] for v in p["naive_vs_ours_kl"].values()]
    lines.append(f"Our probes vs the naive ones (fp32) on the timed layers: max relative difference {max(diffs):.2e}"
                 + (" — our decoder layers ran in bf16, whose rounding moves the smallest KLs most; in fp32 the two "
                    "agree to 1e-4 (tests/test_profile.py)." if s["validated_dtype"] != "float32" else "."))
    if any(r["ratio_to_naive"] > TARGETS["time_ratio"] or r["seconds"] > TARGETS["seconds"] for r in p["ours"].values()):
        lines.append("")
        lines.append(
            "Why a time target is missed: prefix caching removes on average half of the decoder layers from each "
            "probe, but two costs remain that the naive method pays too and caching cannot remove — quantizing the "
            "probed layer's 7 linears with HQQ's iterative optimizer (every (layer, bits) pair is new within one "
            "profile), and the LM head over every calibration token and the 49,152-token vocabulary, which we keep "
            "in fp32 because the KL is a small difference of large terms. Ideas not yet tried: a bf16 head with the "
            "KL written as a difference from the reference's own logits, and a disk cache of quantized layers "
            "shared with the search (which quantizes the same (layer, bits) pairs again).")
    env = p["environment"]
    lines.append(f"\nMachine: {env['cpus']} CPUs ({env['processor']}), torch {env['packages']['torch']}, "
                 f"{env['torch_threads']} threads. Heatmaps: `sensitivity-<dtype>.png`.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
