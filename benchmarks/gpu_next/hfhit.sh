#!/usr/bin/env bash
# hfhit (issue 21 HF row, issue 15 codec item): baseline GPU measurement for the next session.
# Must show: CUDA HF tests pass; raw 32k full hit vs prefill ratio (goal >= 16x, last 14.5-15.4x);
# int8 32k hit ms vs raw hit ms (goal: int8 faster than raw; last 96.0 vs 93.7 ms).
# Budget: <= 3 min on one H200.
set -euo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}src"
python -m pytest -x -q -m gpu tests/integrations/test_hf_transformers.py
DEMO=(python -m kvtier.cli demo --model random:llama-3-8b --device cuda --workloads context
      --contexts 32768 --repeat 2 --gen-tokens 1 --chunk-tokens 256 --no-disk
      --set cpu.max_bytes=9GiB)
timeout 70 "${DEMO[@]}"
timeout 70 "${DEMO[@]}" --kv-codec int8
