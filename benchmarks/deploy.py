"""Deploying what was fine-tuned (issue #30): SmolLM2-135M fine-tuned at the frontier's `3.5bit` and `4bit` plans and
uniform 4-bit r16, exported with `--gguf --merge`, run in llama.cpp.

Per run: the held-out loss on the whole test split in llama.cpp (model.gguf + adapter.gguf, and merged.gguf) against
qradaptor's own (`qradaptor.load`) on the same blocks, the files' sizes against the plan's stored bytes, and
llama.cpp's generation speed against the dense BF16 GGUF of the same model (a bf16 LoRA r16 fine-tune with the same
recipe, merged: what a deployment without qradaptor would run). Speeds are measured in one process, interleaved
(every file once per round, 3 rounds, the median kept), greedy decoding of 128 tokens after a 64-token prompt.

Every run is the frontier's recipe (`benchmarks/frontier.py`: 100 steps of 4×128 tokens, lr 3e-4, bf16, seed 0)
with today's `train` defaults (the activation-weighted adapter start). Work is kept in --work: an interrupted
benchmark resumes from the runs and exports it finished.

Usage: python benchmarks/deploy.py [--work DIR]   (results: benchmarks/results/deploy.{json,md}; ~45 min quiet)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

os.environ.setdefault("QRADAPTOR_DTYPE", "bfloat16")  # before gguf_agreement's own default (float32)
from benchmarks.common import RESULTS, describe_cpu, environment, markdown_table, write_results  # noqa: E402
from benchmarks.gguf_agreement import compare  # noqa: E402

RECIPE = ["--steps", "100", "--batch-size", "4", "--seq-len", "128", "--lr", "3e-4", "--dtype", "bfloat16",
          "--seed", "0"]
SEQ, PROMPT, GENERATE, ROUNDS = 128, 64, 128, 3


def plans() -> dict:
    """The plans deployed: the frontier's searched `3.5bit` and `4bit` plans (as committed), uniform 4-bit r16, and
    the dense bf16 LoRA r16 baseline."""
    frontier = {m["name"]: m for m in json.loads((RESULTS / "frontier.json").read_text())["methods"]}
    return {"qradaptor-3.5bit": frontier["qradaptor-3.5bit"]["plan_layers"],
            "qradaptor-4bit": frontier["qradaptor-4bit"]["plan_layers"],
            "uniform4-r16": [{"bits": 4, "rank": 16}] * 30,
            "lora16 (dense bf16)": [{"bits": 16, "rank": 16}] * 30}


def fine_tune_and_export(work: Path, name: str, layers: list) -> Path:
    from qradaptor.cli import main
    from qradaptor.plan import Plan

    case = work / name.split(" ")[0]
    run, out = case / "run", case / "export"
    if not (run / "metrics.json").is_file():
        case.mkdir(parents=True, exist_ok=True)
        Plan(layers).save(case / "plan.json")
        resume = ["--resume"] if (run / "run.json").is_file() else []
        assert main(["train", "--plan", str(case / "plan.json"), *RECIPE, "--out", str(run), "-q", *resume]) == 0
    if not (out / "merged.gguf").is_file():
        if out.exists():
            import shutil

            shutil.rmtree(out)
        assert main(["export", str(run), "--to", str(out), "--gguf", "--merge", "-q"]) == 0
    return out


def tokens_per_second(model: Path, adapter: Path | None, prompt: list[int]) -> float:
    """llama.cpp's greedy generation speed (tokens/s) after ``prompt``, on every core, logits of the last token only."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=None if adapter is None else str(adapter), n_ctx=PROMPT + GENERATE + 8,
                n_batch=PROMPT, n_threads=os.cpu_count(), verbose=False)

    def next_token() -> int:  # llama.cpp computed the logits of the last token only
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    try:
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(GENERATE):
            llm.eval([next_token()])
        return GENERATE / (time.perf_counter() - start)
    finally:
        llm.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "deploy")
    args = parser.parse_args(argv)
    import torch

    from qradaptor.backends import get_backend
    from qradaptor.data import load_blocks
    from qradaptor.io import atomic_write_text
    from qradaptor.memory import ModelShapes, predict
    from qradaptor.models import load_model
    from qradaptor.plan import Plan

    base, tokenizer = load_model(None)
    shapes = ModelShapes.from_model(base)
    del base
    test = load_blocks(None, tokenizer, "test", seq_len=SEQ)
    blocks = [test.input_ids[i] for i in range(test.input_ids.shape[0])]
    prompt = test.input_ids[0, :PROMPT].tolist()
    cases = []
    for name, layers in plans().items():
        done = args.work / name.split(" ")[0] / "result.json"  # kept: a rerun measures only what is missing
        if done.is_file():
            cases.append(json.loads(done.read_text()))
            continue
        started = time.perf_counter()
        out = fine_tune_and_export(args.work, name, layers)
        plan = Plan(layers)
        info = json.loads((out / "qradaptor" / "export.json").read_text())["gguf"]
        stored = predict(shapes, plan, get_backend("hqq", compute_dtype=torch.bfloat16)).total_bytes
        row = {"name": name, "plan": plan.describe(), "stored_bytes": stored, "gguf": info,
               "merged_bytes": info["merged"]["model_bytes"], **compare(out, blocks)}
        row["seconds"] = time.perf_counter() - started
        atomic_write_text(done, json.dumps(row, indent=1))
        cases.append(row)
        print(name, {k: v for k, v in row.items() if k != "gguf"}, flush=True)

    # generation speed, interleaved: every file once per round
    dense = args.work / "lora16" / "export" / "merged.gguf"
    files = {"dense bf16 (lora16 merged)": (dense, None)}
    for c in cases[:-1]:
        out = args.work / c["name"].split(" ")[0] / "export"
        files[f"{c['name']}: model + adapter"] = (out / "model.gguf", out / "adapter.gguf")
        files[f"{c['name']}: merged"] = (out / "merged.gguf", None)
    speeds: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(ROUNDS):
        for key, (model, adapter) in files.items():
            speeds[key].append(tokens_per_second(model, adapter, prompt))
    speed = {k: statistics.median(v) for k, v in speeds.items()}
    reference = speed["dense bf16 (lora16 merged)"]

    env = environment()
    rows = [[c["name"], c["plan"], f"{c['ours_loss']:.4f}", f"{c['llama_loss']:.4f}",
             f"{c['llama_loss'] - c['ours_loss']:+.4f}", f"{c['merged_loss']:.4f}",
             f"{c['merged_loss'] - c['llama_loss']:+.4f}", f"{c['stored_bytes'] / 2**20:.1f} MiB",
             f"{(c['gguf']['model_bytes'] + c['gguf']['adapter_bytes']) / 2**20:.1f} MiB",
             f"{(c['gguf']['model_bytes'] + c['gguf']['adapter_bytes']) / c['stored_bytes']:.3f}×",
             f"{c['merged_bytes'] / 2**20:.1f} MiB"] for c in cases]
    speed_rows = [[k, f"{v:.1f}", f"{v / reference:.2f}×", " ".join(f"{s:.1f}" for s in speeds[k])]
                  for k, v in speed.items()]
    md = (f"# Deploy: the fine-tuned model in llama.cpp\n\nSmolLM2-135M, {describe_cpu(env)}; llama.cpp through "
          "llama-cpp-python 0.3.36 (built from source, portable AVX2). Each run: 100 steps of 4×128 tokens (lr 3e-4, "
          "bf16, seed 0, the activation-weighted adapter start), exported with `--gguf --merge`. Losses: held-out "
          f"next-token loss (nats) on the whole test split ({len(blocks)} blocks of {SEQ} tokens), in qradaptor "
          "(`qradaptor.load`, bf16) and in llama.cpp (model.gguf + adapter.gguf; merged.gguf). Sizes: the plan's "
          "stored bytes (quantized weights, their scales and zeros, bf16 embeddings and norms, adapters), "
          "model.gguf + adapter.gguf (the adapter in F32), merged.gguf. For the dense row the stored bytes are the "
          "bf16 model with its adapter.\n\n"
          + markdown_table(["run", "plan", "qradaptor loss", "llama.cpp loss", "Δ", "merged loss", "merge cost",
                            "stored", "GGUF files", "GGUF / stored", "merged.gguf"], rows)
          + f"\n## Generation speed\n\nGreedy decoding of {GENERATE} tokens after a {PROMPT}-token prompt, "
          f"{os.cpu_count()} threads, tokens/s: median of {ROUNDS} interleaved rounds (each round's value listed), "
          "and its ratio to the dense BF16 GGUF's.\n\n"
          + markdown_table(["file(s)", "tokens/s", "vs dense bf16", "rounds"], speed_rows))
    write_results("deploy", {"cases": cases, "speed": speed, "speeds": speeds, "environment": env,
                             "settings": {"recipe": RECIPE, "seq_len": SEQ, "prompt": PROMPT, "generate": GENERATE,
                                          "rounds": ROUNDS}}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
