#!/usr/bin/env bash
# Session 6's second GPU call (lead): flex layout / kernel options (#14), DMA shapes incl. one 2D DMA
# per layer group (#21 worker load/save), the worker's gaps profile.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 200 python3 benchmarks/bench_blend_flex_tune.py > "$OUT/flex_tune.txt" 2>&1
timeout 150 python3 benchmarks/bench_dma_shapes.py > "$OUT/dma_shapes.txt" 2>&1
timeout 150 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
tail -n 45 "$OUT"/flex_tune.txt "$OUT"/dma_shapes.txt | cut -c1-200
