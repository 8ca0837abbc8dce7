#!/usr/bin/env bash
# Installs fedbiot into ./.venv, runs FedBiOT in one process (owner + 3 parties, embedded SmolLM2,
# GSM8K sample split over the parties, Dolly sample as the owner's public data), then loads the result
# (AdapFu) with plain transformers + peft and generates an answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo}
# A second demo continues the first: an interrupted run resumes, a finished one is exported again.
RESUME=()
[ -f "$OUT/config.json" ] && RESUME=(--resume)
owner --simulate 3 --rounds 3 --out "$OUT" "${RESUME[@]}" "$@"
python -m owner.generate --adapter "$OUT/adapfu" \
  --prompt "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
