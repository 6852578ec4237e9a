#!/usr/bin/env bash
# The GPU check, in one call on a GPU machine without internet (see benchmarks/gpu_check.py); meant to stay under 8
# minutes on one H100, not yet timed on a GPU in its present form. Prepare the carried folder first on a machine
# with the package installed:  python benchmarks/gpu_prepare.py
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.gpu_carry}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -c "import rapidfuzz" 2>/dev/null || python3 -m pip install -q --no-index --find-links "$CARRY/wheels" rapidfuzz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/gpu_check.py --carry "$CARRY" --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
