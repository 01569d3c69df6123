#!/usr/bin/env bash
# Session 11's third GPU call (lead), with SO_RCVLOWAT and the deferred miss layers: #21's table in one run on one H200: bench_all.py's GPU rows (worker, engine,
# disk, HF 32k) with lookup, TCP and load-or-recompute beside them, then the paged staging ring (bench_gpu_paged.py).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src:benchmarks || exit 1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
timeout 470 python3 benchmarks/bench_all.py --only gpu,lookup,tcp,cost --json "$OUT/all.json" > "$OUT/all.txt" 2>&1
echo "bench_all rc=$?"; grep -E "^\|" "$OUT/all.txt" | cut -c1-260
timeout 100 python3 benchmarks/bench_gpu_paged.py > "$OUT/paged.txt" 2>&1
echo "paged rc=$?"; tail -15 "$OUT/paged.txt"
for r in 1 2; do timeout 60 python3 benchmarks/bench_server_tcp.py --tokens 1024 --repeat 7 > "$OUT/tcp_$r.txt" 2>&1; tail -1 "$OUT/tcp_$r.txt"; done
timeout 90 python3 benchmarks/bench_load_cost.py --prompts 16 > "$OUT/cost.txt" 2>&1; tail -6 "$OUT/cost.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/integrations/test_hf_inplace.py tests/integrations/test_hf_transformers.py tests/gpu > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt"
