#!/usr/bin/env bash
# Session 5's third GPU call: codec CUDA tests (int4 hit finite and = round-trip forward), int4/int8 32k demo, blend5.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
{ timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_codec_cuda.py 2>&1 | tail -25; } > "$OUT/codec_tests.txt" 2>&1
DEMO=(python3 -m kvtier.cli demo --model random:llama-3-8b --device cuda --workloads context --contexts 32768
      --repeat 2 --gen-tokens 1 --chunk-tokens 256 --no-disk --set cpu.max_bytes=9GiB --no-progress)
{ timeout 80 "${DEMO[@]}" --kv-codec int4 2>&1 | grep -v "^ *$" | tail -7; } > "$OUT/int4_demo.txt" 2>&1
{ timeout 280 bash benchmarks/gpu_next/blend5.sh; } > "$OUT/blend5.txt" 2>&1
tail -c 2500 "$OUT"/*.txt
