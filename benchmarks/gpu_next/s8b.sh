#!/usr/bin/env bash
# Session 8's second GPU call (lead), #14: the blend after the check-layer probe pass (attention and
# MLP of the check layer for the selected rows only), copies that no longer wait for layer 0, flex
# compiled with assume_aligned_inputs (K/V views of the KVBuffer); CUDA blend tests first.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_blend_cuda.py tests/blend/test_selection.py tests/blend/test_flex.py tests/blend/test_buffer.py > "$OUT/tests_full.txt" 2>&1
tail -3 "$OUT/tests_full.txt"
timeout 240 python3 benchmarks/bench_blend_gpu.py --requests 8 --profile-requests 1 --trace /tmp/bt --json "$OUT/blend.json" > "$OUT/blend_trace.txt" 2>&1
grep -A12 "^kernels" "$OUT/blend_trace.txt" | cut -c1-120; tail -c 1200 "$OUT/blend_trace.txt"
timeout 100 python3 benchmarks/bench_blend_flex_tune.py > "$OUT/flex_tune.txt" 2>&1
grep -E "in-situ|contiguous_q" "$OUT/flex_tune.txt"
