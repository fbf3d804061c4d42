"""How closely llama.cpp runs a GGUF export (`qradaptor export --gguf`) to what qradaptor computes, on SmolLM2-135M.

For each plan: a short fine-tune (float32, high learning rate so the adapter visibly moves the model), exported with
--gguf, then on the same tokens: the mean per-token KL between qradaptor.load's next-token distribution and
llama.cpp's (with and without the adapter), the top-1 agreement, the cosine between the adapter's change to the
log-probabilities in each, the held-out loss on test blocks in each, the written weights' error per GGUF type, and
the file sizes against the plan's predicted stored bytes. A control writes the uniform 4-bit run with the query and
key rows left in the Hugging Face order (what llama.cpp's converter permutes): the size of a layout error.

Usage: python benchmarks/gguf_agreement.py [--work DIR]   (results: benchmarks/results/gguf_agreement.{json,md})
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("QRADAPTOR_DTYPE", "float32")
if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402

STEPS, LR, BLOCKS, SEQ = 4, 1e-2, 8, 128
PLANS = {
    "uniform 4-bit r8": [(4, 8)] * 30,
    "uniform 8-bit r8": [(8, 8)] * 30,
    "uniform 16-bit r8": [(16, 8)] * 30,
    "mixed 3/4/5/8/16-bit, r4/r8": [({0: 3, 3: 5, 5: 8, 6: 16}.get(i, 4), (4, 8)[i % 2]) for i in range(30)],
}


def fine_tune(work: Path, name: str, layers) -> Path:
    from qradaptor.cli import main
    from qradaptor.plan import LayerChoice, Plan

    case = work / name.replace(" ", "_").replace("/", "-").replace(",", "")
    run = case / "run"
    if not (run / "metrics.json").is_file():
        case.mkdir(parents=True, exist_ok=True)
        Plan([LayerChoice(b, r) for b, r in layers]).save(case / "plan.json")
        assert main(["train", "--plan", str(case / "plan.json"), "--steps", str(STEPS), "--lr", str(LR), "--seq-len",
                     "128", "--batch-size", "2", "--eval-blocks", "2", "--out", str(run), "-q"]) == 0
    return case


def export(case: Path, name: str = "export", merge: bool = True) -> Path:
    from qradaptor.cli import main

    out = case / name
    if not (out / ("merged.gguf" if merge else "adapter.gguf")).is_file():
        if out.exists():  # an export from before merged.gguf was measured
            import shutil

            shutil.rmtree(out)
        assert main(["export", str(case / "run"), "--to", str(out), "--gguf", "-q"] + (["--merge"] if merge else [])) == 0
    return out


def compare(out: Path, blocks) -> dict:
    import torch
    import torch.nn.functional as F

    import qradaptor
    from qradaptor.llamacpp import LlamaCpp

    model = qradaptor.load(out)

    def ours(ids, adapter: bool):
        with torch.no_grad():
            if adapter:
                return torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            with model.disable_adapter():
                return torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)

    def kl(p, q):
        return float((p.exp() * (p - q)).sum(-1).mean())

    def nll(logp, ids):
        return float(F.nll_loss(logp[:-1], ids[1:], reduction="sum")), len(ids) - 1

    merged = (out / "merged.gguf").is_file()
    rows = {"kl_adapter": [], "kl_base": [], "top1": [], "cosine": [], "ours_nll": [0.0, 0], "llama_nll": [0.0, 0]}
    if merged:
        rows.update(kl_merged=[], merged_nll=[0.0, 0])
    with LlamaCpp(out / "model.gguf", out / "adapter.gguf", n_ctx=SEQ) as tuned, \
            LlamaCpp(out / "model.gguf", n_ctx=SEQ) as base, \
            (LlamaCpp(out / "merged.gguf", n_ctx=SEQ) if merged else contextlib.nullcontext()) as one_file:
        for ids in blocks:
            o, ob = ours(ids, True), ours(ids, False)
            t = torch.log_softmax(torch.from_numpy(tuned.logits(ids.tolist())), -1)
            tb = torch.log_softmax(torch.from_numpy(base.logits(ids.tolist())), -1)
            rows["kl_adapter"].append(kl(o, t))
            rows["kl_base"].append(kl(ob, tb))
            rows["top1"].append(float((o.argmax(-1) == t.argmax(-1)).float().mean()))
            rows["cosine"].append(float(F.cosine_similarity((o - ob).flatten(), (t - tb).flatten(), dim=0)))
            logps = [("ours_nll", o), ("llama_nll", t)]
            if merged:
                m = torch.log_softmax(torch.from_numpy(one_file.logits(ids.tolist())), -1)
                rows["kl_merged"].append(kl(o, m))
                logps.append(("merged_nll", m))
            for key, logp in logps:
                s, n = nll(logp, ids)
                rows[key][0] += s
                rows[key][1] += n
    mean = {k: sum(v) / len(v) for k, v in rows.items() if k.startswith(("kl", "top1", "cosine"))}
    for key in ("ours", "llama", "merged"):
        if f"{key}_nll" in rows:
            mean[f"{key}_loss"] = rows[f"{key}_nll"][0] / rows[f"{key}_nll"][1]
    return mean


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "gguf_agreement")
    args = parser.parse_args(argv)
    import torch

    import qradaptor.gguf_export as gguf_export
    from qradaptor.backends import get_backend
    from qradaptor.data import load_blocks
    from qradaptor.memory import ModelShapes, predict
    from qradaptor.models import load_model
    from qradaptor.plan import Plan

    base, tokenizer = load_model(None)
    shapes = ModelShapes.from_model(base)
    del base
    test = load_blocks(None, tokenizer, "test", seq_len=SEQ)
    blocks = [test.input_ids[i] for i in range(BLOCKS)]
    cases = []
    for name, layers in PLANS.items():
        case = fine_tune(args.work, name, layers)
        out = export(case)
        info = json.loads((out / "qradaptor" / "export.json").read_text())
        plan = Plan.load(case / "plan.json")
        stored = predict(shapes, plan, get_backend("hqq", compute_dtype=torch.float32)).total_bytes
        cases.append({"plan": name, **compare(out, blocks), "gguf": info["gguf"], "stored_bytes": stored})
        print(name, {k: v for k, v in cases[-1].items() if k not in ("gguf",)}, flush=True)
    # the control: q/k rows in the Hugging Face order
    case = fine_tune(args.work, "uniform 4-bit r8", PLANS["uniform 4-bit r8"])  # the run measured above
    permutation = gguf_export._permutation
    gguf_export._permutation = lambda rows, heads: torch.arange(rows)
    try:
        control = compare(export(case, "export-hf-order", merge=False), blocks)
    finally:
        gguf_export._permutation = permutation
    env = environment()
    rows = [[c["plan"], f"{c['kl_adapter']:.4f}", f"{c['kl_base']:.4f}", f"{c['top1']:.3f}", f"{c['cosine']:.3f}",
             f"{c['ours_loss']:.4f}", f"{c['llama_loss']:.4f}", f"{c['llama_loss'] - c['ours_loss']:+.4f}",
             f"{c['kl_merged']:.4f}", f"{c['merged_loss']:.4f}", f"{c['merged_loss'] - c['llama_loss']:+.4f}",
             ", ".join(f"{k} {e:.1e}" for k, e in c["gguf"]["relative_error"].items()) or "—",
             f"{(c['gguf']['model_bytes'] + c['gguf']['adapter_bytes']) / c['stored_bytes']:.3f}×"] for c in cases]
    md = (f"# GGUF export in llama.cpp vs qradaptor\n\nSmolLM2-135M, float32, {describe_cpu(env)}; llama.cpp through "
          f"llama-cpp-python 0.3.36 (built from source, portable AVX2). Each plan fine-tuned {STEPS} steps (lr {LR}), "
          f"exported with `--gguf`; {BLOCKS} test blocks of {SEQ} tokens. KL: mean per-token KL(qradaptor ‖ llama.cpp) "
          "with the adapter and without it; top-1: same most likely token; cosine: between the adapter's change to "
          "the log-probabilities in each; losses: held-out next-token loss (nats) in each; weight error: relative "
          "squared error of the written decoder weights per GGUF type; size: model.gguf + adapter.gguf over the "
          "plan's predicted stored bytes (the embeddings are float32 in both). Merged: `--merge --gguf`'s "
          "merged.gguf (every adapter merged into its weight, requantized by HQQ in groups of 32 in the same GGUF "
          "type, so the same size as model.gguf) in llama.cpp: KL(qradaptor ‖ it), its loss, and what the merge "
          "costs against model.gguf + adapter.gguf in llama.cpp.\n\n"
          + markdown_table(["plan", "KL adapter", "KL base", "top-1", "cosine", "qradaptor loss", "llama.cpp loss",
                            "Δ loss", "merged KL", "merged loss", "merge cost", "weight error", "size"], rows)
          + f"\nControl, uniform 4-bit with the q/k rows left in the Hugging Face order: KL {control['kl_adapter']:.4f}, "
          f"top-1 {control['top1']:.3f}, llama.cpp loss {control['llama_loss']:.4f} vs {control['ours_loss']:.4f}.\n")
    write_results("gguf_agreement", {"cases": cases, "control": control, "environment": env,
                                     "settings": {"steps": STEPS, "lr": LR, "blocks": BLOCKS, "seq_len": SEQ}}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
