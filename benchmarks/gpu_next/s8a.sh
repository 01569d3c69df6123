#!/usr/bin/env bash
# Session 8's first GPU call (lead): s6e's checks (CUDA tests incl. recycled ring buffers, the 2D
# row-by-row fallback, kv_codec kt on CUDA; worker rows; the flex in-situ views probe for #14) plus a
# traced blend run for the kernel breakdown. Each part writes to $OUT as it finishes.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/vllm/test_worker.py tests/vllm/test_worker_codec.py tests/vllm/test_worker_kt.py tests/test_keys.py > "$OUT/tests_full.txt" 2>&1
tail -4 "$OUT/tests_full.txt"
timeout 110 python3 benchmarks/bench_blend_flex_tune.py > "$OUT/flex_tune.txt" 2>&1
grep -E "in-situ|strides|hf_layout_q|contiguous_q|sdpa_flash" "$OUT/flex_tune.txt"
timeout 200 python3 benchmarks/bench_blend_gpu.py --requests 4 --profile-requests 1 --trace /tmp/bt --json "$OUT/blend.json" > "$OUT/blend_trace.txt" 2>&1
grep -A24 "^kernels" "$OUT/blend_trace.txt" | cut -c1-150; tail -c 900 "$OUT/blend_trace.txt"
timeout 110 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
grep -E "anchor|group" "$OUT/paths.txt" | cut -c1-160
