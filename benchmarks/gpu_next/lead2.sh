#!/usr/bin/env bash
# Session 5's second GPU call (lead, merged main). Must show: the codec CUDA tests pass (device decode =
# host decode bit for bit; an HF hit under int8/int4 = the forward over the round trip); the int8 32k hit
# is now faster than the raw one (was 106.6 vs 91.5 ms); then each helper's own script.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
mkdir -p "$OUT"
{ date -u; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_codec_cuda.py tests/gpu/test_quant_kernels.py \
    tests/integrations/test_hf_transformers.py -m gpu 2>&1 | tail -15; } > "$OUT/lead_tests.txt" 2>&1
DEMO=(python3 -m kvtier.cli demo --model random:llama-3-8b --device cuda --workloads context --contexts 32768
      --repeat 2 --gen-tokens 1 --chunk-tokens 256 --no-disk --set cpu.max_bytes=9GiB --no-progress)
{ for c in none int8 int4; do timeout 90 "${DEMO[@]}" --kv-codec $c 2>&1 | grep -v "^ *$" | tail -6; done; } > "$OUT/lead_demo.txt" 2>&1
for h in "$@"; do
  { date -u; timeout 200 bash "benchmarks/gpu_next/$h.sh"; } > "$OUT/$h.txt" 2>&1
done
tail -c 1200 "$OUT"/*.txt
