#!/usr/bin/env bash
# Session 8's fifth GPU call (not lent a machine; for the next session), #21: where the worker load's 4.5-5.9 ms host lead goes (for the next session).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 150 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
grep -E "^---|begin_|gap |lead|dma" "$OUT/worker_gaps.txt" | cut -c1-250 | head -60
