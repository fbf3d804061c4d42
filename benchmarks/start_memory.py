"""What the adapter start costs in memory and what it changes in held-out loss, through `qradaptor train` itself:
uniform 4-bit r16 on SmolLM2 with ``--adapter-init zero`` and ``activation``, each in a fresh process (4×256-token
batches, the training defaults). Per start: the process's peak RSS (VmHWM: loading, the start's fit, quantizing
and training), the training peak `train` measures after the model is built (what memory.md compares), its
prediction, and the validation loss after the steps.

    .venv/bin/python benchmarks/start_memory.py [--steps 20]

Writes benchmarks/results/start_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep benchmarks/ off sys.path (profile.py would shadow the stdlib's)
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if pathlib.Path(p or ".").resolve() != _here]

from benchmarks.common import describe_cpu, environment, markdown_table, write_results  # noqa: E402

CHILD = """
import sys, json
from qradaptor.commands import train_plan
from qradaptor.device import process_memory
r = train_plan(sys.argv[1], plan={"layers": [{"bits": 4, "rank": 16}] * 30}, steps=int(sys.argv[3]), seq_len=256,
               batch_size=4, eval_blocks=16, adapter_init=sys.argv[2], progress=False)
print(json.dumps({"process_peak_bytes": process_memory("VmHWM"), "training_peak": r.metrics["training_peak"],
                  "validation_loss": r.validation["loss"], "start": json.load(open(sys.argv[1] + "/run.json")).get("adapter_start")}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qradaptor-start-memory-") as work:
        for method in ("zero", "activation"):
            proc = subprocess.run([sys.executable, "-c", CHILD, f"{work}/{method}", method, str(args.steps)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            rows.append({"adapter_init": method, **json.loads(proc.stdout.strip().splitlines()[-1])})
    mib = 2**20
    table = markdown_table(
        ["--adapter-init", "process peak MiB", "training peak MiB (measured)", "predicted MiB", "start s",
         f"validation loss after {args.steps} steps"],
        [[r["adapter_init"], f"{r['process_peak_bytes'] / mib:.0f}",
          f"{r['training_peak']['measured_bytes'] / mib:.0f}", f"{r['training_peak']['predicted_bytes'] / mib:.0f}",
          f"{r['start']['seconds']:.1f}" if r["start"] else "—", f"{r['validation_loss']:.4f}"] for r in rows])
    payload = {"steps": args.steps, "rows": rows, "environment": environment()}
    md = ("# The adapter start: memory and loss through `qradaptor train`\n\nSmolLM2-135M-Instruct, uniform 4-bit r16, "
          f"{args.steps} steps of 4×256 tokens, the default data and dtype; each start in a fresh process.\n\n" + table
          + f"\nCPU: {describe_cpu(payload['environment'])}.\n")
    write_results("start_memory", payload, md)
    print(md)


if __name__ == "__main__":
    main()
