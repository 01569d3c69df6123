#!/usr/bin/env bash
# blend5 (issue 14, speed goal: blend at 15 % >= 3x faster than full prefill on the H200; last 2.88x).
# Must show: (1) CUDA blend tests pass, incl. flex = the default on CUDA and equal to the mask path
# (fp32/bf16) and no recompile for new (n_sel, S); (2) attention level: flex_ms vs dense_incl_repeat_ms
# (probe: 1.59 vs 2.39), block_mask_build_ms (create_block_mask was 8.7), first_call_s (= the compile
# cost of a process's first blend request), recompiled=false; (3) bench_blend_gpu: speedup_paired_median
# (goal >= 3.0), flex_gain_paired_median (blend with the dense mask / blend with flex, same run),
# first_blend_ttft_s, flex_fault (must be null), flex_kernel_mode ("dynamic"; "automatic" = dynamic did not build). Budget: <= 3 min on one H200.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
echo "== CUDA blend tests"
timeout 60 python -m pytest -x -q -p no:cacheprovider -m gpu tests/gpu/test_blend_cuda.py 2>&1 | tail -15
echo "== flex at attention level"
timeout 35 python benchmarks/bench_blend_flex_gpu.py 2>&1 | tail -5
echo "== paired TTFT full vs blend (flex) vs blend (mask), 15 %"
timeout 85 python benchmarks/bench_blend_gpu.py --requests 6 --profile-requests 1 2>&1 | tail -12
