#!/usr/bin/env bash
# Session 12's second GPU call (lead), after the HF hit's 2D DMAs and tapered layer groups: the HF path's GPU tests,
# then #21's table in one run on one GPU: bench_all.py's GPU rows (worker, engine, disk, HF 32k with its A/B rows)
# with lookup, TCP and load-or-recompute beside them, then the paged staging ring (bench_gpu_paged.py).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src:benchmarks || exit 1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
python3 -c "import time,xxhash,os; b=os.urandom(1<<28); t=time.perf_counter(); xxhash.xxh3_64_intdigest(b); print(f'one-thread xxh3 {len(b)/(time.perf_counter()-t)/1e9:.1f} GB/s')"
timeout 80 python3 -m pytest -q -p no:cacheprovider -k "not smollm2" tests/transfer/test_chunk_runs.py tests/integrations/test_hf_inplace.py tests/integrations/test_hf_transformers.py tests/integrations/test_hf_mla.py tests/gpu/test_codec_cuda.py > "$OUT/tests.txt" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/tests.txt"
timeout 360 python3 benchmarks/bench_all.py --only gpu,lookup,tcp,cost --json "$OUT/all.json" > "$OUT/all.txt" 2>&1
echo "bench_all rc=$?"; grep -E "^\|" "$OUT/all.txt" | cut -c1-260
timeout 45 python3 benchmarks/bench_gpu_paged.py > "$OUT/paged.txt" 2>&1
echo "paged rc=$?"; tail -15 "$OUT/paged.txt"
