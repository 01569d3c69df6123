#!/usr/bin/env bash
# Session 12's first GPU call (lead): the HF 32k full hit with one 2D DMA per layer group (ChunkedLayerwiseKV.ROWS2D)
# against one DMA per chunk, same run, twice; the GPU tests of the HF path; a cProfile of the hit's host side.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src:benchmarks || exit 1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
python3 -c "import time,xxhash,os; b=os.urandom(1<<28); t=time.perf_counter(); xxhash.xxh3_64_intdigest(b); print(f'one-thread xxh3 {len(b)/(time.perf_counter()-t)/1e9:.1f} GB/s')"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/transfer/test_chunk_runs.py tests/integrations/test_hf_inplace.py tests/integrations/test_hf_transformers.py tests/integrations/test_hf_mla.py tests/gpu/test_codec_cuda.py tests/gpu/test_blend_cuda.py > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; tail -4 "$OUT/tests.txt"
for r in 1 2; do
  timeout 150 python3 benchmarks/bench_gpu_paths.py --parts hf --json "$OUT/hf_$r.json" > "$OUT/hf_$r.txt" 2>&1; echo "hf run $r rc=$?"; grep -E "full|hit|diff" "$OUT/hf_$r.txt" | cut -c1-240
done
timeout 150 python3 benchmarks/profile_gpu_gaps.py --parts hf --out /tmp/prof > "$OUT/hf_gaps.txt" 2>&1; echo "hf gaps rc=$?"; grep -E "^---|gap " "$OUT/hf_gaps.txt" | cut -c1-400
