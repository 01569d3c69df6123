#!/usr/bin/env bash
# Session 12's third GPU call (lead), on s12b's machine while warm (its /tmp/site kept): the HF 32k hit rows three more times.
export PYTHONPATH=/tmp/site:src:benchmarks; mkdir -p $OUT; for r in 1 2 3; do timeout 70 python3 benchmarks/bench_gpu_paths.py --parts hf > $OUT/hf_$r.txt 2>&1; echo "run $r rc=$?"; grep -E "full (hit|prefill)" $OUT/hf_$r.txt | cut -c1-200; done
