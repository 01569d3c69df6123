#!/usr/bin/env bash
# Session 6's third GPU call (lead): the worker load with 2D runs (#21; tests, bench_gpu_paths worker,
# gaps + save lead profile) and attention backends for the blend's selected rows (#14).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_grouped_cpu.py tests/vllm/test_worker.py 2>&1 | tail -6 > "$OUT/tests.txt"
timeout 150 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
timeout 120 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
timeout 200 python3 benchmarks/bench_blend_flex_tune.py > "$OUT/flex_tune.txt" 2>&1
cat "$OUT/tests.txt"; tail -n 16 "$OUT/paths.txt"; grep -E "^---|begin_|gap " "$OUT/worker_gaps.txt" | cut -c1-250; grep -E "uniform|skewed" "$OUT/flex_tune.txt" | cut -c1-200
