#!/usr/bin/env bash
# Session 8's fourth GPU call (lead), #14: the flex warm-up with K/V at nonzero offsets (s8c's first
# real flex call recompiled: request 1 took 0.5-1.5 s); CUDA blend tests; the blend bench once more.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rxs tests/gpu/test_blend_cuda.py > "$OUT/tests_full.txt" 2>&1
grep -E "XFAIL|SKIP|FAIL|passed|failed" "$OUT/tests_full.txt" | cut -c1-250 | tail -8
timeout 200 python3 benchmarks/bench_blend_gpu.py --requests 8 --profile-requests 1 --json "$OUT/blend.json" > "$OUT/blend.txt" 2>&1
grep -E "^[0-9] |flex kernel build" "$OUT/blend.txt" | cut -c1-160; tail -c 1000 "$OUT/blend.txt"
