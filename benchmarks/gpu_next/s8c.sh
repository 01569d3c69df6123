#!/usr/bin/env bash
# Session 8's third GPU call (lead), #14: attention="auto" = flex once built in the background (no
# compile inside a request); the blend bench twice (robustness of the >= 3x row), its CUDA tests,
# and the worker rows once more (#21: s8a's load 0.947x).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rxs tests/gpu/test_blend_cuda.py tests/blend/test_flex.py tests/blend/test_selection.py > "$OUT/tests_full.txt" 2>&1
grep -E "XFAIL|SKIP|FAIL|passed|failed" "$OUT/tests_full.txt" | cut -c1-250 | tail -8
for run in 1 2; do
  timeout 200 python3 benchmarks/bench_blend_gpu.py --requests 8 --profile-requests 1 $([ $run = 1 ] && echo --trace /tmp/bt) --json "$OUT/blend$run.json" > "$OUT/blend$run.txt" 2>&1
  grep -E "^[0-9] |flex kernel build" "$OUT/blend$run.txt" | cut -c1-160
  [ $run = 1 ] && grep -A8 "^kernels blend " "$OUT/blend$run.txt" | cut -c1-110
  tail -c 1000 "$OUT/blend$run.txt"; echo
done
timeout 100 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
grep -E "anchor|group" "$OUT/paths.txt" | cut -c1-160
