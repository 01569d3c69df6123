#!/usr/bin/env bash
# hfcache (issue 21 HF row: 32k full hit >= 16x prefill; last 14.97x = 93.7 ms vs 1402 ms, H200).
# Must show: (1) the CUDA HF tests pass (in-place layers filled from pinned chunk views / host rows,
# MLA latent, beams); (2) same-run rows "before: cat layers" vs "now: in-place layers" full-hit TTFT
# and their speedup vs prefill (goal >= 16x), plus the logit diff line (expect 0 or bf16 rounding);
# (3) the profile of the in-place hit: no 128 x ~104 us CatArrayBatchedCopy, no 32 x 170 us clone,
# one copy kernel per layer instead (the fill from the group staging buffer).
# Budget: <= 3 min on one H200 (tests ~30 s, bench ~60 s with the profile).
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
python3 -m pytest -x -q -p no:cacheprovider -m gpu tests/integrations/test_hf_transformers.py \
  tests/integrations/test_hf_mla.py
timeout 150 python3 benchmarks/bench_gpu_paths.py --parts hf --profile
