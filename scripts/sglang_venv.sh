#!/usr/bin/env bash
# Build .venv-sglang: sglang 0.5.23 (--no-deps) + only what its HiCache storage and host-pool
# modules import, + kvtier (editable), for the SGLang HiCache backend tests.
# Idempotent: a stamp file skips the install when nothing changed.
# torch: sglang pins torch==2.14.1 and imports torchvision at host-pool import time; PyPI's
# torchvision fails to import beside the local CPU torch 2.13.0 ('torchvision::nms does not
# exist'), so this venv takes torch 2.14.1 + torchvision 0.29.1 (a CUDA build that runs on the
# CPU; pip takes both from the machine's local wheel store where it has one). ~6 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SGLANG_VENV:-.venv-sglang}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.kvtier-sglang-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
CONSTRAINT="$(mktemp)"
trap 'rm -f "$CONSTRAINT"' EXIT
echo "torch==2.14.1" >"$CONSTRAINT"
$PIP install -q --upgrade pip
$PIP install -q -c "$CONSTRAINT" torch==2.14.1 torchvision==0.29.1
$PIP install -q --no-deps "sglang==0.5.23"
# What sglang.srt.mem_cache.{hicache_storage,storage.backend_factory,pool_host} import, found by
# importing them in a bare venv; plus kvtier's own light deps and the test tools.
$PIP install -q -c "$CONSTRAINT" numpy msgspec pyyaml prometheus_client tqdm xxhash zstandard lz4 redis \
  orjson psutil pybase64 requests pillow pydantic pyzmq aiohttp dill triton starlette ipython \
  transformers "apache-tvm-ffi==0.1.11" sentencepiece compressed_tensors gguf pytest pytest-timeout
$PIP install -q --no-deps -e .
"$VENV/bin/python" -c "import sglang.srt.mem_cache.pool_host, kvtier.integrations.sglang; print('sglang', __import__('sglang').__version__, 'ok')"
touch "$STAMP"
