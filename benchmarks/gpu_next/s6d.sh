#!/usr/bin/env bash
# Session 6's fourth GPU call (lead): worker load/save after the 2D runs + growing feed batches +
# one token conversion (#21), the worker's leads by function, blend flex vs mask kernels in situ (#14).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_grouped_cpu.py tests/vllm/test_worker.py tests/test_keys.py 2>&1 | tail -4 > "$OUT/tests.txt"
timeout 150 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
timeout 120 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
timeout 240 python3 benchmarks/bench_blend_gpu.py --requests 4 --profile-requests 1 --trace /tmp/bt > "$OUT/blend_trace.txt" 2>&1
cat "$OUT/tests.txt"; grep -E "anchor|group" "$OUT/paths.txt" | cut -c1-160; grep -E "^---|begin_|gap " "$OUT/worker_gaps.txt" | cut -c1-250; grep -A16 "^kernels" "$OUT/blend_trace.txt" | cut -c1-150; tail -c 700 "$OUT/blend_trace.txt"
