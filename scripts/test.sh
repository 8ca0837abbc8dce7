#!/usr/bin/env bash
# Installs fedbiot into ./.venv and runs the test suite (tiny random models plus one end-to-end run of
# the embedded model over real sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
