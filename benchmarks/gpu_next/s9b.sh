#!/usr/bin/env bash
# Session 9's second GPU call (lead): #21, the worker load with group 1 issued at attach (group 0 alone while
# chunks stream in): probe_worker_lead.py (FEED_BATCH 8 and 16) and the worker rows twice; the grouped tests.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_grouped_cpu.py tests/vllm/test_worker.py tests/vllm/test_worker_kt.py > "$OUT/tests.txt" 2>&1
tail -2 "$OUT/tests.txt"
for fb in 8 16; do
  timeout 100 python3 benchmarks/probe_worker_lead.py --repeats 4 --feed-batch $fb > "$OUT/lead_$fb.txt" 2>&1
  echo "feed batch $fb"; grep -E "^anchor|^run" "$OUT/lead_$fb.txt" | cut -c1-220
done
grep -E "  " "$OUT/lead_8.txt" | tail -17
for r in 1 2; do
  timeout 110 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths_$r.json" > "$OUT/paths_$r.txt" 2>&1
  grep -E "anchor|now" "$OUT/paths_$r.txt" | cut -c1-160
done
