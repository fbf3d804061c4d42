"""Per-module sensitivity on SmolLM2-135M (issue #29 item 1): does the cheap estimate rank linears as their own
probes do, and what does it add to the profile's time?

The estimate (`ProfileSettings.modules`, `profile --modules`) splits each layer's measured KL among its linears as
the layer's output error with each linear alone quantized compares with the whole layer's: one layer's forward per
linear, on the first `module_tokens` calibration tokens. The full measurement (`profile.module_agreement`) probes
each linear alone as a layer's probe is made: the rest of the network run on every calibration token, 7× the
probes of the per-layer profile. Reported: Spearman of estimate vs full over all (layer, linear) pairs and within
layers (mean), per bit-width; seconds of the per-layer profile with and without the estimates (same process, same
tokens, one after the other).

Settings: bits 2 and 4, 1,024 calibration tokens (blocks of 256), module_tokens 1,024 (all of them: the estimate's
dearest setting), bf16 decoder (this machine's default), seed 0. Work (profiles, each bit-width's full probes) is
kept in --work, so a rerun resumes.

Usage: python benchmarks/module_profile.py [--work DIR] [--smoke]   (~15 min on 2 cores;
results: benchmarks/results/module_profile.{json,md})
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import describe_cpu, environment, markdown_table, write_results  # noqa: E402

BITS = (2, 4)
TOKENS = 1024
SEQ_LEN = 256
DTYPE = "bfloat16"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "module_profile")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny random model, seconds; results in --work as module_profile-smoke.{json,md}")
    args = parser.parse_args(argv)
    import torch

    from qradaptor.io import atomic_write_json
    from qradaptor.precision import DTYPES
    from qradaptor.profile import ProfileSettings, calibration_blocks, module_agreement, profile_model

    if args.smoke:
        from transformers import LlamaConfig, LlamaForCausalLM

        from qradaptor.data import TokenBlocks

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
        blocks, tokens, seq_len = TokenBlocks(ids, ids.clone()), 128, 32
        model = model.to(DTYPES[DTYPE])
    else:
        from qradaptor.models import load_model

        model, tokenizer = load_model(None, dtype=DTYPES[DTYPE])
        tokens, seq_len = TOKENS, SEQ_LEN
        blocks = calibration_blocks(tokenizer, ProfileSettings(tokens=tokens, seq_len=seq_len), model)

    def settings(modules: bool) -> ProfileSettings:
        return ProfileSettings(bits=BITS, tokens=tokens, seq_len=seq_len, dtype=DTYPE, modules=modules,
                               module_tokens=tokens)

    # the two profiles, one after the other: their seconds are comparable (resumed ones are not: then unrecorded)
    profiles, seconds = {}, {}
    for modules in (False, True):
        out = args.work / ("modules" if modules else "layers")
        fresh = not (out / "sensitivity.json").is_file()
        started = time.perf_counter()
        profiles[modules] = profile_model(model, None, settings(modules), blocks=blocks, out=out, use_cache=False,
                                          progress=not args.smoke) if fresh else None
        if fresh:
            seconds[modules] = time.perf_counter() - started
            (out / "seconds.json").write_text(json.dumps({"seconds": seconds[modules]}))
        else:
            from qradaptor.profile import Sensitivity

            profiles[modules] = Sensitivity.load(out / "sensitivity.json")
            seconds[modules] = json.loads((out / "seconds.json").read_text())["seconds"]
    estimated = profiles[True]

    agreements = {}
    for b in BITS:
        path = args.work / f"agreement-{b}bit.json"
        if not path.is_file():
            atomic_write_json(path, module_agreement(model, estimated, settings(True), blocks, bits=b,
                                                     progress=not args.smoke))
        agreements[b] = json.loads(path.read_text())

    env = environment()
    rows = [[f"{b}", f"{a['spearman']:.3f}", f"{a['spearman_within_layers']:.3f}",
             f"{sum(sum(r.values()) for r in a['measured']) / sum(estimated.kl[l][b] for l in range(estimated.layers)):.2f}"]
            for b, a in agreements.items()]
    ratio = seconds[True] / seconds[False]
    md = (f"# Per-module sensitivity: the estimate against each linear's own probe\n\n"
          f"{'SMOKE (tiny random model)' if args.smoke else 'SmolLM2-135M'}, {describe_cpu(env)}. Profile at bits "
          f"{list(BITS)} on {tokens} calibration tokens (blocks of {seq_len}), bf16 decoder, seed 0. Estimate: each "
          "layer's KL split among its linears by the layer's output error with that linear alone quantized (one "
          f"layer's forward each, on all {tokens} tokens here). Full: the KL with that linear alone quantized, the "
          "rest of the network run (7× the per-layer probes).\n\n"
          + markdown_table(["bits", "Spearman, all (layer, linear) pairs", "Spearman within a layer (mean of "
                            f"{estimated.layers})", "Σ linears' KL / Σ layers' KL (full)"], rows)
          + f"\nProfile seconds: per-layer {seconds[False]:.0f} s, with the per-module estimates "
            f"{seconds[True]:.0f} s ({ratio:.2f}×; the estimates ran on all {tokens} tokens, the default runs "
            "them on 1,024 of the profile's 4,096).\n")
    payload = {"settings": {"bits": list(BITS), "tokens": tokens, "seq_len": seq_len, "dtype": DTYPE,
                            "module_tokens": tokens},
               "seconds": {"layers": seconds[False], "with_modules": seconds[True], "ratio": ratio},
               "agreement": {str(b): a for b, a in agreements.items()}, "environment": env}
    if args.smoke:
        write_results("module_profile-smoke", payload, md, directory=args.work)
    else:
        write_results("module_profile", payload, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
