#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch first, then genhancer with the extras named as arguments
# (none: what the demo needs; `test`: the test suite's, DeepSpeed included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: a bare `pip install torch` (as a dependency) would pull the multi-GB CUDA build
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
extras=$(IFS=,; echo "$*")
python -m pip install -q -e ".${extras:+[$extras]}"
