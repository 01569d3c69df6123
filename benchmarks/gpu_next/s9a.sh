#!/usr/bin/env bash
# Session 9's first GPU call (lead): session 8's unrun GPU test changes (test_blend_cuda: flex tests on selections
# above one 128-row block, the small-selection mask test); #21, where the worker load's host lead goes
# (probe_worker_lead.py: stage times without the profiler, the first DMA's device time), and the worker rows.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rxs tests/gpu/test_blend_cuda.py > "$OUT/tests_blend.txt" 2>&1
tail -8 "$OUT/tests_blend.txt"
timeout 120 python3 benchmarks/probe_worker_lead.py --repeats 4 > "$OUT/lead.txt" 2>&1
cat "$OUT/lead.txt" | cut -c1-200 | tail -70
timeout 110 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
grep -E "anchor|group" "$OUT/paths.txt" | cut -c1-160
