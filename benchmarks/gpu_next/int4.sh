#!/bin/bash
# Next GPU session, branch int4 (issue 15), <= 3 min, run from the repository root with PYTHONPATH=src.
# Must show: (1) CUDA tests pass (kernels bit-exact with the torch codec, incl. KIVI_VALUE_TOKENS 16/32);
# (2) int4 overlapped store/load at the default 16 groups still >= 3.2x memcpy (09:12 run: 3.24x / 3.29x);
# (3) whether --kivi-value-tokens 16 (or 32) recovers the int4 gather kernel alone (589 GB/s with 64,
#     805 GB/s before the one-launch change) and the serial int4 store (2.55x, was 2.72-2.80x). If it does,
#     set quant_triton.KIVI_VALUE_TOKENS to the winner and record it in benchmarks/RESULTS.md.
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_quant_kernels.py tests/vllm/test_worker_codec.py \
  tests/test_engine_packed.py 2>&1 | tail -25
for v in 64 16 32; do
  timeout 30 python3 benchmarks/bench_kv_codec_gpu.py --codecs int4 --groups 16 --kivi-value-tokens $v
done
date -u
