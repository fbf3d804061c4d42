"""The ``qradaptor`` command: parse, call the library, print. Nothing here that the library lacks."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import QRAdaptorError

DTYPES = ("float32", "bfloat16")


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cmd_memory(args) -> int:
    from .memory import plan_memory

    report = plan_memory(args.model, args.plan, backend=args.backend, dtype=_dtype(args.dtype), measure=args.measure,
                         budget=args.budget)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from .memory import format_bytes

    print(f"plan:            {report['plan']}")
    print(f"predicted:       {format_bytes(report['predicted_bytes'])} ({report['predicted_bytes']} bytes)")
    if "measured_bytes" in report:
        diff = report["measured_bytes"] / report["predicted_bytes"] - 1
        print(f"measured:        {format_bytes(report['measured_bytes'])} ({report['measured_bytes']} bytes, {diff:+.3%})")
    print(f"  quantized linears {format_bytes(report['quantized_bytes'])}, LoRA adapters "
          f"{format_bytes(report['lora_bytes'])}, everything else {format_bytes(report['other_bytes'])}")
    print(f"avg bits:        {report['avg_bits']:.3f} per decoder-linear weight, scales and zeros included "
          f"({report['code_bits']:.3f} code bits)")
    print(f"trainable:       {report['trainable_params']:,} LoRA parameters")
    if "budget_bytes" in report:
        margin = report["budget_bytes"] - report["predicted_bytes"]
        verdict = "fits" if report["fits"] else "does NOT fit"
        print(f"budget:          {format_bytes(report['budget_bytes'])}: the plan {verdict} "
              f"({format_bytes(abs(margin))} {'to spare' if margin >= 0 else 'over'})")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_model

    result = evaluate_model(args.model, data=args.data, split=args.split, plan=args.plan, backend=args.backend,
                            seq_len=args.seq_len, max_blocks=args.max_blocks, progress=not args.quiet)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        what = f" quantized as {result['plan']}" if result["plan"] else ""
        print(f"{args.split} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"over {result['tokens']} tokens{what}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    result = run_demo(model=args.model, steps=args.steps, seed=args.seed, out=args.out, progress=not args.quiet)
    s = result.settings
    print(f"\nqradaptor demo: {s['model']} ({s['backend']}, group size 64; the shipped weights were already "
          f"4-bit at group size 32), {s['train']['steps']} LoRA steps of {s['train']['batch_size']}×{s['seq_len']} "
          f"tokens each, held-out loss on {s['eval_tokens']} tokens\n")
    print(result.table())
    print(f"\nmemory counts quantized weights with their scales and zeros, LoRA adapters (fp32) and every "
          f"unquantized tensor; finished in {s['seconds']:.0f} s")
    if args.out:
        print(f"plans and results written to {args.out}/")
    return 0


def cmd_profile(args) -> int:
    from .profile import RESULT_FILE, profile

    bits = [int(b) for b in args.bits.split(",") if b.strip()]
    result = profile(args.model, data=args.data, out=args.out, bits=bits, tokens=args.tokens, backend=args.backend,
                     dtype=args.dtype, group_size=args.group_size, force=args.force,
                     use_cache=not args.no_cache, progress=not args.quiet)
    how = "from the cache" if result.from_cache else f"in {result.seconds:.0f} s"
    print(f"profiled {result.layers} layers × bits {result.bits} {how} → {args.out}/{RESULT_FILE}")
    lowest = min(result.bits)
    top = result.ranking(lowest)[:5]
    print(f"most sensitive at {lowest} bits: " + ", ".join(f"layer {l} (KL {result.kl[l][lowest]:.4f})" for l in top))
    for b, kl in result.kl_uniform.items():
        print(f"whole model at {b} bits: KL {kl:.5f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qradaptor",
        description="Choose per-layer bit-widths and LoRA ranks under a memory budget, and fine-tune the result.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("memory", parents=[common], help="bytes a plan takes on a model (predicted from shapes; --measure builds it)")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--plan", required=True, help="plan file (.json or .yaml)")
    p.add_argument("--backend", default="hqq", help="quantizer backend: hqq (default) or reference")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="base and metadata dtype (default float32)")
    p.add_argument("--measure", action="store_true", help="also build the model and count the bytes it holds")
    p.add_argument("--budget", default=None,
                   help="also check the plan against a budget: 4bit, 3.5bit, 350MB, 1.2GiB, 123456789 or 0.3x")
    p.add_argument("--json", action="store_true", help="print JSON (keys predicted_bytes, measured_bytes, avg_bits, ...)")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("evaluate", parents=[common], help="held-out loss and perplexity of a model (optionally quantized by a plan)")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--data", default=None, help="JSONL/JSON/TXT file or HF dataset name (default: CPython's pydoc topics)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--plan", default=None, help="quantize the model by this plan first")
    p.add_argument("--backend", default="hqq", help="quantizer backend: hqq (default) or reference")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate at most this many blocks")
    p.add_argument("--json", action="store_true", help="print JSON (keys loss, perplexity, tokens, ...)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("profile", parents=[common], help="per-layer KL sensitivity to quantization (stage 1)")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--data", default=None, help="calibration data (default: CPython's pydoc topics, train split)")
    p.add_argument("--bits", default="2,3,4", help="bit-widths to probe per layer (default 2,3,4)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--backend", default="hqq", help="quantizer backend (default hqq)")
    p.add_argument("--group-size", type=int, default=64, help="weights per quantization group (default 64)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="decoder layers' compute dtype during the probes (bfloat16 is faster; the LM head stays fp32)")
    p.add_argument("--out", required=True, help="directory for sensitivity.json and sensitivity.png")
    p.add_argument("--force", action="store_true", help="replace a profile of a different model in --out")
    p.add_argument("--no-cache", action="store_true", help="recompute even if an identical profile is cached")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", parents=[common], help="fine-tune uniform 4-bit and a mixed plan of the same memory on the default model")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=25, help="LoRA training steps per plan (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="where to write the plans and demo.json (default runs/demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except QRAdaptorError as e:
        print(f"qradaptor: error: {e.cause}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qradaptor: interrupted; finished work is kept (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
