#!/bin/bash
# Issue 17's checks in one call of the device tool (a CUDA machine lent to the session): the CUDA tests, then the
# GPU check (benchmarks/gpu.py), with everything they print and write kept under $OUT.
#
# Prepare here, once (the device image has torch, transformers, peft, numpy, tqdm, accelerate, einops; the rest
# travels as wheels for its Python 3.12, in .whl/, which .git/info/exclude must ignore):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       optuna==5.0.0 alembic==1.20.1 colorlog==6.12.0 SQLAlchemy==2.1.9 Mako==1.4.3 gguf==0.19.0 termcolor==3.3.0
#   .venv/bin/pip wheel --no-deps --no-build-isolation hqq==0.2.8.post1 -w .whl     # hqq is an sdist only
# Then one call: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590), and commit the
# benchmarks/results/gpu.{json,md} it returns (under files_at).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing the carried wheels failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 HF_HOME=/tmp/hf-home
OUT=${OUT:-/tmp/gpu-session-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
# The CUDA tests (they skip on a machine without a GPU; here none may skip), then the rest of those two files.
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_packing.py 2>&1 | tee "$OUT/tests.log"
tests=$?
timeout 400 python3 benchmarks/gpu.py --work /tmp/gpu-work 2>&1 | tee "$OUT/gpu.log"
check=$?
cp benchmarks/results/gpu.json benchmarks/results/gpu.md "$OUT/" 2>/dev/null
echo "gpu_session: tests exit $tests, GPU check exit $check"
exit $(( tests || check ))
