#!/usr/bin/env bash
# Session 6's fifth GPU call (lead): worker rows with recycled ring buffers (#21), flex with the blend's
# own tensor views (#14), the merged tree's CUDA tests. Also covers kv_codec kt on CUDA (tests/gpu/test_codec_cuda.py, session 7).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/vllm/test_worker.py tests/vllm/test_worker_codec.py tests/test_keys.py 2>&1 | tail -4 > "$OUT/tests.txt"
timeout 150 python3 benchmarks/bench_gpu_paths.py --parts worker --json "$OUT/paths.json" > "$OUT/paths.txt" 2>&1
timeout 100 python3 benchmarks/profile_gpu_gaps.py --parts worker --out /tmp/gaps > "$OUT/worker_gaps.txt" 2>&1
timeout 150 python3 benchmarks/bench_blend_flex_tune.py > "$OUT/flex_tune.txt" 2>&1
cat "$OUT/tests.txt"; grep -E "anchor|group" "$OUT/paths.txt" | cut -c1-160; grep -E "^---|begin_|gap " "$OUT/worker_gaps.txt" | cut -c1-250; grep -E "in-situ|strides|hf_layout_q|contiguous_q" "$OUT/flex_tune.txt"
