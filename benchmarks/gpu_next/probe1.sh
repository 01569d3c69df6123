#!/usr/bin/env bash
# Session 5's first GPU call (lead, merged main): int4 follow-up, flex-attention probe for the blend's
# selected layers (#14), disk->GPU and HF 32k rows with profiles (#21), HF raw vs int8 hits (#15).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
{ bash benchmarks/gpu_next/int4.sh; } > "$OUT/int4.txt" 2>&1
timeout 150 python3 benchmarks/bench_blend_attn_gpu.py > "$OUT/blend_attn.txt" 2>&1
timeout 150 python3 benchmarks/bench_gpu_paths.py --parts disk,hf --profile --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
{ timeout 200 bash benchmarks/gpu_next/hfhit.sh; } > "$OUT/hfhit.txt" 2>&1
tail -c 1500 "$OUT"/*.txt
