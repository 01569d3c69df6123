#!/usr/bin/env bash
# disk2 (issue 21 row: retrieve straight from the disk tier to the GPU >= 0.9x raw read + H2D).
# Must show: "retrieve(out=gpu) straight from the disk tier" (read_ahead=3, the new default) at
# >= 0.9x its same-run anchor "raw readinto + H2D" (last session: 125.9 vs 95.7 ms = 0.761x with
# the one-at-a-time path, which is the "read_ahead=0" row here); fresh-tensor reads 0; the
# read_ahead 1/2/4 rows and the host-only rows (raw readinto, xxh3, tier reads) say where any
# remaining gap is. Both runs should agree. Then the disk / read-ahead / retrieve-stream tests
# (incl. the CUDA buffer-recycling test, whose pool is now sized for READ_AHEAD).
# Budget: <= 3 min on one H200.
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
for i in 1 2; do
  echo "### run $i"
  timeout 75 python3 benchmarks/bench_gpu_paths.py --parts disk
done
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/tiers/test_disk.py tests/tiers/test_disk_crash.py \
  tests/tiers/test_disk_read_ahead.py tests/test_retrieve_stream.py
