"""The ``qradaptor`` command: parse, call the library, print. Nothing here that the library lacks."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings

from . import threads
from .errors import QRAdaptorError
from .rundir import ADAPTER_INITS, DEFAULT_START_TOKENS

DTYPES = ("auto", "float32", "bfloat16")  # precision.DTYPE_CHOICES, without importing torch to parse arguments
#: What every --dtype says about its default (one default across commands: precision.default_dtype).
_DTYPE_AUTO = ("auto (default): bfloat16 where this machine computes it fast (a GPU with bf16, a CPU with AVX512-BF16 "
               "or AMX), float32 elsewhere")


class _Parser(argparse.ArgumentParser):
    """argparse with qradaptor's error format: one ``qradaptor: error:`` line and a fix, exit 2."""

    def error(self, message: str):
        print(f"qradaptor: error: {message}", file=sys.stderr)
        print(f"  fix: see `{self.prog} --help` for what each option accepts", file=sys.stderr)
        sys.exit(2)


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated module names such as q_proj,v_proj, got {text!r}")
    return names


def _target_modules_flag(parser: argparse.ArgumentParser, default: str = "q,k,v,o,gate,up,down_proj where the "
                         "model has them, else every linear of the layer") -> None:
    parser.add_argument("--target-modules", type=_name_list, default=None, metavar="NAMES",
                        help=f"linears of each decoder layer that get adapters, e.g. q_proj,v_proj (default: {default})")


def _int_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers, as --bits and --ranks take (e.g. 2,3,4)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item.lstrip("-").isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 2,3,4, got {text!r}")
    return tuple(int(item) for item in items)


def _number(kind: type, low: float, *, above: bool = False):
    """An argparse type: an int or a finite float at least (or above) ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value) or (value <= low if above else value < low):
            what = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} {'above' if above else 'at least'} {low:g}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_positive_int = _number(int, 1)
_count = _number(int, 0)
_positive_float = _number(float, 0, above=True)
_fraction = _number(float, 0)


def _bit_width(text: str) -> int:
    """An argparse type: a bit-width from 2 to 8 (the prior's ``recovered_bits``)."""
    value = _number(int, 2)(text)
    if value > 8:
        raise argparse.ArgumentTypeError(f"must be a bit-width from 2 to 8, got {text!r}")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


_KINDS = {"positive_int": _positive_int, "count": _count, "int": int, "positive_float": _positive_float, "text": _text}


def _settings_table() -> list:
    """The fields of `RunConfig` that are command-line settings: those that carry their help."""
    from dataclasses import fields

    from .rundir import RunConfig

    return [f for f in fields(RunConfig) if "help" in f.metadata]


def _training_settings(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """The training settings as flags, default None (not given: the run's default, or on --resume the run's own):
    `train` and `run` take them from this one table."""
    length = None
    for f in _settings_table():
        if f.name in skip:
            continue
        kind, text = f.metadata["kind"], f.metadata["help"]
        if f.default is not None and "default" not in text:
            shown = ("on" if f.default else "off") if kind == "bool" else f"{f.default:g}" if kind.endswith(
                "float") else f.default
            text += f" (default {shown})"
        target = parser
        if f.name in ("steps", "epochs"):  # one or the other sets the length of the run
            length = length or parser.add_mutually_exclusive_group()
            target = length
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == "dtype":
            target.add_argument(flag, default=None, choices=DTYPES, help=text)
        elif f.metadata.get("choices"):
            target.add_argument(flag, default=None, choices=f.metadata["choices"], help=text)
        else:
            target.add_argument(flag, type=_KINDS[kind], default=None, help=text)


def _given_training_settings(args, *, skip: tuple[str, ...] = ()) -> dict:
    """The training settings the command line gave (those it did not are left out)."""
    return {f.name: getattr(args, f.name) for f in _settings_table()
            if f.name not in skip and getattr(args, f.name, None) is not None}


#: What `run` defines itself rather than from train's table (its final fine-tune's length, one block size for all
#: stages), and the training settings its search takes too.
_RUN_OWN = ("steps", "epochs", "seq_len")
#: The exploration's flags (`search` and `run`), and what `run` passes to its search.
_EXPLORATION = ("population", "promote", "refine", "bits", "ranks", "genes", "group_sizes", "target_modules",
                "dora", "expert_adapters", "rank_value", "recovered_bits")
_SEARCHED = (*_EXPLORATION, "backend", "seed", "adapter_init", "start_tokens")
#: `search.GENE_LAYOUTS`, spelled out: the CLI parses without importing torch (tests check they agree)
GENE_LAYOUTS = ("layer", "groups", "module")


def _given_search_settings(args) -> dict:
    return {k: getattr(args, k) for k in _EXPLORATION if getattr(args, k, None) is not None}


def _setting_help(name: str) -> str:
    return next(f.metadata["help"] for f in _settings_table() if f.name == name)


def cmd_memory(args) -> int:
    from .commands import plan_memory

    report = plan_memory(args.model, args.plan, backend=args.backend, dtype=args.dtype, measure=args.measure,
                         budget=args.budget, batch_size=args.batch_size, seq_len=args.seq_len,
                         checkpointing=args.gradient_checkpointing)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from .commands import format_bytes

    print(f"plan:            {report['plan']}, priced in {report['dtype']} (base, scales and zeros)")
    print(f"predicted:       {format_bytes(report['predicted_bytes'])} ({report['predicted_bytes']} bytes)")
    if "measured_bytes" in report:
        diff = report["measured_bytes"] / report["predicted_bytes"] - 1
        print(f"measured:        {format_bytes(report['measured_bytes'])} ({report['measured_bytes']} bytes, {diff:+.3%})")
    print(f"  quantized linears {format_bytes(report['quantized_bytes'])}, LoRA adapters "
          f"{format_bytes(report['lora_bytes'])}, everything else {format_bytes(report['other_bytes'])}")
    print(f"avg bits:        {report['avg_bits']:.3f} per decoder-linear weight, scales and zeros included "
          f"({report['code_bits']:.3f} code bits)")
    print(f"trainable:       {report['trainable_params']:,} LoRA parameters")
    g = report["gguf"]
    if g is not None:
        types = ", ".join(f"{kind} ×{n}" for kind, n in g["types"].items())
        print(f"GGUF files:      {format_bytes(g['total_bytes'])} ({g['total_bytes']} bytes, "
              f"{g['total_bytes'] / report['predicted_bytes']:.3f}× the stored bytes): model.gguf "
              f"{format_bytes(g['model_bytes'])} + adapter.gguf {format_bytes(g['adapter_bytes'])}, "
              f"as `export --gguf` writes them; decoder linears {types}")
    else:
        print(f"GGUF files:      not available ({report['gguf_unavailable']})")
    if report["expert_weights"]:
        print(f"routed experts:  {report['expert_weights'] / report['decoder_weights']:.1%} of the decoder weights, "
              "quantized at their layer's bits, " + ("an adapter on every expert at its layer's rank"
                                                     if report["expert_adapters"] else "no adapters"))
    if report["unquantized_weights"] > 0.01 * report["decoder_weights"]:
        print(f"not quantized:   {report['unquantized_weights'] / report['decoder_weights']:.1%} of the decoder "
              "weights are not in linear modules: at the base dtype, in everything else")
    t = report["training"]
    print(f"training peak:   {format_bytes(t['peak_bytes'])} predicted for batches of {t['batch_size']}×{t['seq_len']} "
          f"tokens, gradient checkpointing {'on' if t['checkpointing'] else 'off'}")
    print(f"  runtime {format_bytes(t['runtime_bytes'])}, model {format_bytes(t['weights_bytes'])}, LoRA gradients "
          f"{format_bytes(t['gradient_bytes'])}, AdamW state {format_bytes(t['optimizer_bytes'])}, activations "
          f"{format_bytes(t['activation_bytes'])}, loss {format_bytes(t['loss_bytes'])}, freed memory the heap "
          f"keeps {format_bytes(t['allocator_bytes'])}" + (f" ({t['allocator']} allocation)" if t["allocator"] else ""))
    if "budget_bytes" in report:
        used = {"training peak": t["peak_bytes"], "GGUF files": (g or {}).get("total_bytes")}.get(
            report["budget_on"], report["predicted_bytes"])
        margin = report["budget_bytes"] - used
        verdict = "fits" if report["fits"] else "does NOT fit"
        print(f"budget:          {format_bytes(report['budget_bytes'])} on the {report['budget_on']}: the plan {verdict} "
              f"({format_bytes(abs(margin))} {'to spare' if margin >= 0 else 'over'})")
        fit = report.get("fitting_batch", {})
        if not report["fits"] and fit:
            print(f"  fits with --batch-size {fit['batch_size']}"
                  + (" and gradient checkpointing" if fit["checkpointing"] else ""))
        elif fit is None:
            print("  no batch size fits, even 1 block with gradient checkpointing: use a shorter --seq-len or a "
                  "smaller plan")
    return 0


def cmd_evaluate(args) -> int:
    from .commands import evaluate_model

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()] if args.lm_eval else None
    result = evaluate_model(args.model, data=args.data, split=args.split, plan=args.plan, backend=args.backend,
                            seq_len=args.seq_len, max_blocks=args.max_blocks, lm_eval_tasks=tasks,
                            include_path=args.include_path, progress=not args.quiet,
                            device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        what = f" quantized as {result['plan']}" if result["plan"] else ""
        print(f"{args.split} loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
              f"over {result['tokens']} tokens{what}")
        for task, metrics in result.get("lm_eval", {}).items():
            print(f"lm-eval {task}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return 0


def cmd_demo(args) -> int:
    from .commands import run_demo

    result = run_demo(out=args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    s = result.settings
    cheap, full = s["search"]["cheap"]["steps"], s["search"]["full"]["steps"]
    print(f"\nqradaptor demo: SmolLM2-135M-Instruct, budget {s['budget']} (HQQ, group size 64; the shipped weights "
          f"were already 4-bit at group size 32), {s['steps']} LoRA steps of 4×{s['seq_len']} tokens for each plan; "
          f"test-split loss on {s['eval_blocks']}×{s['seq_len']} tokens; compared with the best uniform setting the "
          f"search measured in the budget\n")
    print(result.table())
    continued = [f"{name} from step {s[key]}" for name, key in (("the found plan", "continued_from_step"),
                                                                ("the uniform setting", "baseline_continued_from_step"))
                 if s.get(key)]
    print(f"\nmemory counts quantized weights with their scales and zeros, LoRA adapters (fp32) and every unquantized "
          f"tensor. Small demo settings: a {s['trials']}-trial search for the lowest loss within the budget (--alpha "
          f"{s['alpha']:g}), measuring plans on the first {cheap} steps of "
          f"the final fine-tune, then {full} for the promoted ones"
          + (f"; the final fine-tunes continued the search's runs ({', '.join(continued)})" if continued else "")
          + f"; finished in {s['seconds']:.0f} s.")
    print(f"artifacts: {s['out']}/search/pareto.png, {s['out']}/model/ (export: stock transformers + peft, or "
          f"qradaptor.load), {s['out']}/demo.json")
    return 0


def cmd_run(args) -> int:
    from .commands import run

    training = _given_training_settings(args, skip=_RUN_OWN)
    # the search fine-tunes with the final fine-tune's backend and seed
    searching = {k: v for k, v in {**_given_search_settings(args), **training}.items() if k in _SEARCHED}
    result = run(args.model, data=args.data, budget=args.budget, out=args.out, alpha=args.alpha, trials=args.trials,
                 steps=args.steps, seq_len=args.seq_len, profile_tokens=args.profile_tokens, progress=not args.quiet,
                 device=args.device, search_settings=searching, train_settings=training, search_lr=args.search_lr)
    print(f"test loss {result['test_loss_before']:.4f} before, {result['test_loss_after']:.4f} after training "
          f"({result['test_tokens']} tokens); plan {result['plan']}; model {result['model']}/")
    timed = result.get("stage_seconds") or {}
    if timed:
        print("stage seconds (the attempt that finished each): "
              + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in timed.items()))
    return 0


def cmd_profile(args) -> int:
    from .commands import RESULT_FILE, profile

    bits = list(args.bits)
    result = profile(args.model, data=args.data, out=args.out, bits=bits, tokens=args.tokens, backend=args.backend,
                     dtype=args.dtype, group_size=args.group_size, seq_len=args.seq_len, force=args.force,
                     use_cache=not args.no_cache, progress=not args.quiet, device=args.device, modules=args.modules)
    how = "from the cache" if result.from_cache else f"in {result.seconds:.0f} s"
    print(f"profiled {result.layers} layers × bits {result.bits} {how} → {args.out}/{RESULT_FILE}")
    lowest = min(result.bits)
    top = result.ranking(lowest)[:5]
    print(f"most sensitive at {lowest} bits: " + ", ".join(f"layer {l} (KL {result.kl[l][lowest]:.4f})" for l in top))
    if result.module_kl:
        ranked = sorted(((row[lowest], l, m) for l, layer in enumerate(result.module_kl) for m, row in layer.items()),
                        reverse=True)[:5]
        print(f"most sensitive linears at {lowest} bits (estimated): "
              + ", ".join(f"layer {l} {m} (KL {kl:.4f})" for kl, l, m in ranked))
    for b, kl in result.kl_uniform.items():
        print(f"whole model at {b} bits: KL {kl:.5f}")
    return 0


def cmd_search(args) -> int:
    from .commands import search, summary

    settings = {**_given_search_settings(args), "backend": args.backend, "seed": args.seed, "seq_len": args.seq_len,
                "adapter_init": args.adapter_init, "start_tokens": args.start_tokens}
    result = search(args.model, data=args.data, budget=args.budget, out=args.out, alpha=args.alpha, trials=args.trials,
                    storage=args.storage, study=args.study, sensitivity=args.sensitivity, progress=not args.quiet,
                    device=args.device, dtype=args.dtype, final_steps=args.final_steps, search_lr=args.search_lr,
                    **settings)
    print(summary(result), end="")
    print(f"wrote {args.out}/plan.json, pareto.json, pareto.png")
    return 0


def cmd_worker(args) -> int:
    from .commands import worker

    trials = worker(storage=args.storage, study=args.study, progress=not args.quiet, device=args.device)
    print(f"study {args.study} has {trials} exploration trials")
    return 0


def cmd_train(args) -> int:
    from .commands import format_bytes, train_plan

    r = train_plan(args.out, plan=args.plan, model=args.model, data=args.data, budget=args.budget, resume=args.resume,
                   progress=not args.quiet, device=args.device, init_from=args.init_from,
                   target_modules=args.target_modules, dora=args.dora, expert_adapters=args.expert_adapters,
                   **_given_training_settings(args))
    resumed = f" (resumed at step {r.resumed_from})" if r.resumed_from else ""
    print(f"trained {r.config.steps} steps{resumed}: final training loss {r.train.final_loss:.4f}", end="")
    if r.validation:
        print(f", validation loss {r.validation['loss']:.4f} (perplexity {r.validation['perplexity']:.2f})", end="")
    peak = r.metrics.get("training_peak") or {}
    if peak.get("measured_bytes") is not None:
        print(f"\ntraining peak {format_bytes(peak['measured_bytes'])} measured ({peak['what']}), "
              f"{format_bytes(peak['predicted_bytes'])} predicted", end="")
    print(f"\nwrote {args.out}/ (adapter/, metrics.json, run.json); next: qradaptor export {args.out} --to OUT")
    return 0


def cmd_export(args) -> int:
    from .commands import export
    from .commands import format_bytes

    result = export(args.run, args.to, merge=args.merge, gguf=args.gguf)
    mem = result["memory"]
    print(f"exported {args.run} → {args.to}/: {mem['plan']}, {format_bytes(mem['measured_bytes'])} on reload "
          f"(predicted {format_bytes(mem['predicted_bytes'])})")
    print(f"load it with transformers + peft (dequantized base + adapter/) or qradaptor.load({str(args.to)!r})"
          + (f"; merged model in {result['merged']}/" if result["merged"] else ""))
    if result["gguf"]:
        g = result["gguf"]
        kinds = ", ".join(f"{n} {k}" for k, n in g["types"].items())
        errors = ", ".join(f"{k} {e:.1e}" for k, e in g["relative_error"].items()) or "none quantized"
        print(f"GGUF for llama.cpp / Ollama: {args.to}/model.gguf ({format_bytes(g['model_bytes'])}; tensors: {kinds}; "
              f"relative squared error of the written decoder weights: {errors}) + adapter.gguf "
              f"({format_bytes(g['adapter_bytes'])}) + Modelfile (ollama create NAME -f {args.to}/Modelfile)")
        if g.get("merged"):
            m = g["merged"]
            errors = ", ".join(f"{k} {e:.1e}" for k, e in m["relative_error"].items()) or "none quantized"
            print(f"  merged: {args.to}/merged.gguf ({format_bytes(m['model_bytes'])}; every adapter merged and "
                  f"requantized in its layer's type; relative squared error against the merged weights: {errors})")
    return 0


def cmd_generate(args) -> int:
    from .commands import generate

    print(generate(args.artifact, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed, device=args.device))
    return 0


def _threads(text: str):
    try:
        return threads.parse_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_threads, default=None, metavar="{auto,all,N}",
                        help="CPU compute threads: auto (default, or $QRADAPTOR_THREADS: this process's share of the "
                             "cores among the qradaptor processes running on the machine, re-counted as they come "
                             "and go), all (every core, whatever else runs) or a number")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qradaptor",
        description="Choose per-layer bit-widths and LoRA ranks under a memory budget, and fine-tune the result.",
    )
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    on_device = _Parser(add_help=False)
    on_device.add_argument("--device", default=None, metavar="{auto,cpu,cuda}",
                           help="where the model computes: auto (default: a CUDA GPU when PyTorch sees one, else the "
                                "CPU), cpu or cuda (cuda:N for GPU N)")
    _threads_flag(on_device)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("memory", parents=[common], help="bytes a plan takes on a model (predicted from shapes; --measure builds it)")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--plan", required=True, help="plan file (.json or .yaml)")
    p.add_argument("--backend", default="hqq", help="quantizer backend: hqq (default), hqq-native or reference")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the base, scales and zeros, as train computes: " + _DTYPE_AUTO)
    p.add_argument("--measure", action="store_true", help="also build the model and count the bytes it holds")
    p.add_argument("--budget", default=None,
                   help="also check the plan against a budget: on the stored model (4bit, 3.5bit, 350MB, 1.2GiB, "
                        "123456789, 0.3x), on the training peak (train:1.5GiB) or on the GGUF files (gguf:120MB)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="blocks per micro-batch of the training peak (default 4)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per block of the training peak (default 256)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="price training with gradient checkpointing (default on, as train)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (keys predicted_bytes, measured_bytes, avg_bits, training, ...)")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("evaluate", parents=[common, on_device], help="held-out loss and perplexity of a model (optionally quantized by a plan)")
    p.add_argument("--model", default=None,
                   help="model directory, .gguf file, hub id, train --out directory or export directory (default: SmolLM2-135M)")
    p.add_argument("--data", default=None, help="JSONL/JSON/TXT file or HF dataset name (default: CPython's pydoc topics)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--plan", default=None, help="quantize the model by this plan first")
    p.add_argument("--backend", default="hqq", help="quantizer backend: hqq (default), hqq-native or reference")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per block (default 256)")
    p.add_argument("--max-blocks", type=_positive_int, default=None, help="evaluate at most this many blocks")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="also run these lm-eval harness tasks, comma-separated, offline (needs the lmeval extra)")
    p.add_argument("--include-path", default=None, help="directory of lm-eval task YAML files (local tasks)")
    p.add_argument("--json", action="store_true", help="print JSON (keys loss, perplexity, tokens, lm_eval, ...)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("profile", parents=[common, on_device], help="per-layer KL sensitivity to quantization (stage 1)")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--data", default=None, help="calibration data (default: CPython's pydoc topics, train split)")
    p.add_argument("--bits", type=_int_list, default=(2, 3, 4), help="bit-widths to probe per layer (default 2,3,4)")
    p.add_argument("--tokens", type=_positive_int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--backend", default="hqq", help="quantizer backend (default hqq)")
    p.add_argument("--group-size", type=_positive_int, default=64, help="weights per quantization group (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per calibration block (default 256)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="decoder layers' compute dtype during the probes (the LM head stays fp32): " + _DTYPE_AUTO)
    p.add_argument("--out", required=True, help="directory for sensitivity.json and sensitivity.png")
    p.add_argument("--force", action="store_true", help="replace a profile of a different model in --out")
    p.add_argument("--no-cache", action="store_true", help="recompute even if an identical profile is cached")
    p.add_argument("--modules", action="store_true",
                   help="also estimate each linear's KL (q_proj, k_proj, ...): its share of its layer's, from the "
                        "layer's output error with that linear alone quantized")
    p.set_defaults(func=cmd_profile)

    # What `search` and `run` share: the model, the data, the budget and the search's size and preference.
    budgeted = _Parser(add_help=False)
    budgeted.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    budgeted.add_argument("--data", default=None, help="fine-tuning data (default: CPython's pydoc topics)")
    budgeted.add_argument("--budget", required=True,
                          help="memory budget on the stored model (4bit, 3.5bit, 350MB, 1.2GiB, 123456789, 0.3x), on "
                               "the predicted training peak (train:1.5GiB), or on the files `export --gguf` writes "
                               "for llama.cpp (gguf:120MB)")
    budgeted.add_argument("--alpha", type=float, default=0.5,
                          help="preference: 1 = only quality, 0 = only memory (default 0.5)")
    budgeted.add_argument("--trials", type=_positive_int, default=8, help="search exploration trials, cheap fidelity (default 8)")
    # the exploration's size, default None (not given: SearchConfig's defaults, which the help names)
    budgeted.add_argument("--search-lr", type=_positive_float, default=None, metavar="LR",
                          help="peak learning rate of the search's fine-tunes (default: the final fine-tune's, whose "
                               "first steps they then are; `search` without --final-steps: 3e-4)")
    budgeted.add_argument("--population", type=_positive_int, default=None, help="NSGA-II population (default 4)")
    budgeted.add_argument("--promote", type=_count, default=None,
                          help="front plans re-evaluated at full fidelity, besides the warm start's uniform settings "
                               "and prior fill (default 1)")
    budgeted.add_argument("--refine", type=_count, default=None, help="Bayesian refinement iterations (default 1)")
    budgeted.add_argument("--rank-value", type=_positive_float, default=None, metavar="V",
                          help="the search prior's price of halving a layer's rank, in units of that layer's 4-bit KL: it "
                               "orders the warm start's fill and the repair into the budget, the fine-tunes still rank "
                               "plans (default 1.4 with a quantization-aware --adapter-init, 1/3 with zero; a study "
                               "keeps the price it began with)")
    budgeted.add_argument("--recovered-bits", type=_bit_width, default=None, metavar="B",
                          help="the search prior charges a layer's bits only their KL above its KL at B bits, which the "
                               "fine-tune is counted on recovering from its start (default 4 with a quantization-aware "
                               "--adapter-init, 8 with zero: the whole KL; a study keeps the value it began with)")
    budgeted.add_argument("--bits", type=_int_list, default=None,
                          help="bit-widths to choose from (default 2,3,4,5,6,8)")
    budgeted.add_argument("--ranks", type=_int_list, default=None, help="LoRA ranks to choose from (default 4,8,16,32)")
    budgeted.add_argument("--genes", default=None, choices=GENE_LAYOUTS,
                          help="what each choice of bits and rank is for: each decoder layer (layer, the default), each "
                               "block of a layer (groups: attention, MLP) or each linear (module); finer ones are "
                               "priced by per-linear sensitivity (`run` profiles with --modules)")
    budgeted.add_argument("--group-sizes", type=_int_list, default=None, metavar="G,G,...",
                          help="also choose each unit's quantization group size among these (e.g. 32,64,128; 64 must "
                               "be one), where it divides the unit's rows; priced exactly, its effect estimated from "
                               "each weight's group ranges (default: every linear at group size 64)")
    _target_modules_flag(budgeted)
    budgeted.add_argument("--dora", action="store_true", default=None,
                          help="DoRA adapters in every plan (QDoRA: a trained magnitude per output row besides the "
                               "LoRA pair; budgets in bits are priced with them)")
    budgeted.add_argument("--expert-adapters", action="store_true", default=None,
                          help="adapters on the routed experts of an MoE model too, one per expert at its layer's rank "
                               "(default: none; budgets in bits are priced with them)")

    p = sub.add_parser("search", parents=[common, budgeted, on_device], help="find a per-layer plan within a memory budget (stages 2-3)")
    p.add_argument("--backend", default="hqq", help="quantizer backend (default hqq)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per training/evaluation block (default 256)")
    p.add_argument("--sensitivity", default=None, help="sensitivity.json (default: OUT/sensitivity.json, profiled if missing)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help=_setting_help("dtype") + "; the plans' fine-tunes compute in it and are priced in it")
    p.add_argument("--adapter-init", default="activation", choices=ADAPTER_INITS,
                   help=_setting_help("adapter_init") + "; the plans' fine-tunes start so (default activation)")
    p.add_argument("--start-tokens", type=_positive_int, default=DEFAULT_START_TOKENS,
                   help=_setting_help("start_tokens") + f" (default {DEFAULT_START_TOKENS})")
    p.add_argument("--final-steps", type=_positive_int, default=None, metavar="N",
                   help="measure plans on the first steps of an N-step fine-tune (train's default batch size and lr) "
                        "and keep the chosen plan's run, which `train --steps N --dtype D --init-from` continues")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in OUT); PostgreSQL for workers")
    p.add_argument("--study", default=None, help="study name (default qradaptor)")
    p.add_argument("--out", required=True, help="directory for plan.json, pareto.json, pareto.png and the study")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("worker", parents=[common, on_device], help="evaluate trials of a search study from another machine")
    p.add_argument("--storage", required=True, help="the study's Optuna storage URL (e.g. postgresql://...)")
    p.add_argument("--study", required=True, help="the study name given to `qradaptor search --study`")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("train", parents=[common, on_device], help="fine-tune a plan on its quantized base (checkpoints, --resume)")
    p.add_argument("--model", default=None, help="model directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--plan", default=None, help="plan file (.json or .yaml); with --resume, the run's own by default")
    p.add_argument("--data", default=None, help="JSONL/JSON/TXT file or HF dataset name (default: CPython's pydoc topics)")
    _target_modules_flag(p, "the plan's target_modules")
    p.add_argument("--dora", action=argparse.BooleanOptionalAction, default=None,
                   help="DoRA adapters (QDoRA on the quantized base: a trained magnitude per output row besides the "
                        "LoRA pair), or --no-dora for plain LoRA (default: the plan's `dora`, false)")
    p.add_argument("--expert-adapters", action=argparse.BooleanOptionalAction, default=None,
                   help="adapters on an MoE model's routed experts too, one per expert at its layer's rank, or "
                        "--no-expert-adapters (default: the plan's `expert_adapters`, false)")
    _training_settings(p)
    p.add_argument("--budget", default=None,
                   help="refuse to start when the predicted training peak exceeds train:SIZE (e.g. train:1.5GiB), "
                        "or the plan exceeds a budget on the stored model (4bit, 350MB, ...) or on its GGUF files "
                        "(gguf:120MB)")
    p.add_argument("--out", required=True, help="run directory (run.json, checkpoints/, adapter/, metrics.json)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its last checkpoint")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from a search's kept run of this plan (the first steps of this very fine-tune) "
                        "instead of step 0: those steps are not trained again")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", parents=[common], help="write a trained run as a directory stock transformers + peft load")
    p.add_argument("run", help="the --out directory of `qradaptor train`")
    p.add_argument("--to", required=True, help="output directory (built under a temporary name, then renamed)")
    p.add_argument("--merge", action="store_true",
                   help="also write TO/merged/: the adapter folded into the dequantized base; with --gguf also "
                        "TO/merged.gguf, one llama.cpp file with the adapters merged and requantized")
    p.add_argument("--gguf", action="store_true",
                   help="also write TO/model.gguf (HQQ codes as Q4_1/Q5_1, 6-8 bits as Q8_0), TO/adapter.gguf and a "
                        "Modelfile, for llama.cpp and Ollama (bases loaded from a .gguf file)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", parents=[common, on_device], help="continue a prompt with a trained model (export or run directory)")
    p.add_argument("artifact", help="an exported directory (or a finished run directory)")
    p.add_argument("--prompt", type=_text, required=True, help="the prompt (wrapped in the chat template when the tokenizer has one)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_fraction, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", parents=[common, budgeted, on_device], help="profile, search, train, evaluate and export in one command")
    p.add_argument("--steps", type=_positive_int, default=200, help="steps of the final fine-tune (default 200)")
    p.add_argument("--seq-len", type=_positive_int, default=256,
                   help="tokens per block in every stage (default 256)")
    p.add_argument("--profile-tokens", type=_positive_int, default=None,
                   help="calibration tokens of the sensitivity profile (default 4096, or all the training split has)")
    _training_settings(p, skip=_RUN_OWN)  # --seed and --backend also go to the search
    p.add_argument("--out", required=True, help="run directory; rerun the same command to continue after a crash")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", parents=[common],
                       help="`run` on the embedded default with small settings, vs the best uniform setting in its budget")
    p.add_argument("--steps", type=_positive_int, default=20, help="LoRA training steps per plan (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); rerunning continues it")
    _threads_flag(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_optuna(quiet: bool) -> None:
    """Optuna logs every trial (the search shows a progress bar instead) and a Ctrl-C inside a trial as a failed
    trial with its traceback (the CLI says it in one line). With --quiet, Optuna's warnings are hidden too."""
    import optuna

    class DropInterrupts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines: the search has its own progress bar
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, DropInterrupts) for f in handler.filters):
            handler.addFilter(DropInterrupts())
        handler.setLevel(logging.ERROR if quiet else logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad option (already reported): an exit code, for callers of main()
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # peft asks transformers about gradient checkpointing through a deprecated alias on every adapter
    # attach/load; the warning is theirs, not the user's, and would interleave with our one-line errors.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"
    if args.command in ("search", "worker", "run", "demo"):
        _quiet_optuna(args.quiet)
    try:
        if hasattr(args, "threads"):
            threads.share_cores(args.threads if args.threads is not None else threads.default_threads())
        return args.func(args)
    except QRAdaptorError as e:
        print(f"qradaptor: error: {e.cause}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "add --resume to continue" if args.command == "train" else "rerun the same command to continue"
        print(f"qradaptor: interrupted; finished work is kept ({hint})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
