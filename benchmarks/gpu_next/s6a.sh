#!/usr/bin/env bash
# Session 6's first GPU call (lead): where the blend's 187 ms go (device idle vs host, #14) and where the
# vLLM worker load / save lose against memcpy (#21), with today's baselines.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout 240 python3 benchmarks/bench_blend_gpu.py --requests 4 --profile-requests 1 --trace /tmp/bt > "$OUT/blend_trace.txt" 2>&1
timeout 150 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
timeout 150 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
tail -c 3000 "$OUT"/paths.txt
