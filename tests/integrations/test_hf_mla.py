"""MLA (DeepSeek-V2/V3-style latent KV) in the transformers integration.

transformers caches each layer's latent as keys ``[B, 1, T, kv_lora_rank]`` (normalised
``kv_nope``) and values ``[B, 1, T, qk_rope_head_dim]`` (RoPE'd ``k_rot``); kvtier stores them as
one plane ``[L, 1, T, 1, rank + rope]`` (namespace ``kv_planes`` 1). Tiny random models built in
code: a prefix hit reproduces the fresh prefill (fp32 logits within 1e-4, greedy tokens equal).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine, random_ids
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_cache import model_kv_spec
from kvtier.transfer.layerwise import LayerwiseKV, cache_to_kv
from kvtier.transfer.layout import LayoutError

RANK, ROPE = 32, 8
MLA: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=RANK,
    q_lora_rank=None,
    qk_rope_head_dim=ROPE,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
)


def _v3() -> Any:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(DeepseekV3Config(n_group=1, topk_group=1, **MLA)).eval()


def _v2() -> Any:
    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(DeepseekV2Config(**MLA)).eval()


@pytest.mark.parametrize("make", [_v3, _v2], ids=["deepseek_v3", "deepseek_v2"])
def test_mla_prefix_hit_equals_fresh_prefill_and_generate(make: Any) -> None:
    model = make()
    spec = model_kv_spec(model)
    assert (spec.planes, spec.num_kv_heads, spec.head_dim, spec.latent_split) == (1, 1, RANK + ROPE, RANK)
    ids = random_ids(40, vocab=256)
    ref = full_logits(model, ids)
    with make_engine(chunk_tokens=8) as engine:
        first = kvt.prefill(model, ids, engine)
        ns = engine.namespace
        assert ns is not None and ns.kv_planes == 1 and tuple(ns.kv_shape) == (2, 1, RANK + ROPE)
        assert first.stored_tokens == 40
        again = kvt.prefill(model, ids, engine)
        assert again.hit_tokens == 39
        assert (again.logits - ref).abs().max() < 1e-4
        assert torch.equal(again.next_token, ref.argmax(-1, keepdim=True))
        # the loaded latent is the stored one, bit for bit, in both halves
        kv = engine.retrieve(ids[0], extras=kvt.request_extras(model)).kv
        assert kv is not None and tuple(kv.shape) == (2, 1, 40, 1, RANK + ROPE)
        for i, layer in enumerate(again.cache.layers):
            assert torch.equal(layer.keys[0, 0, :39], kv[i, 0, :39, 0, :RANK])
            assert torch.equal(layer.values[0, 0, :39], kv[i, 0, :39, 0, RANK:])
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
        got = kvt.generate(model, ids, engine, max_new_tokens=8, do_sample=False)
        assert torch.equal(got, want)


def test_mla_batch_rows_share_the_hit() -> None:
    model = _v3()
    a, b = random_ids(32, seed=1, vocab=256), random_ids(32, seed=2, vocab=256)
    with make_engine(chunk_tokens=8) as engine:
        kvt.prefill(model, torch.cat([a, b]), engine)
        r = kvt.prefill(model, torch.cat([a, b]), engine)
        assert r.hit_tokens == 31
        ref = torch.cat([full_logits(model, a), full_logits(model, b)])
        assert (r.logits - ref).abs().max() < 1e-4


def test_latent_rows_round_trip_and_refuse_a_mismatched_cache() -> None:
    """``cache_to_kv(latent_split=)`` and ``LayerwiseKV`` are inverse; a cache whose widths are not
    the namespace's split is refused (never stored as wrong rows)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    for i in range(2):
        cache.update(torch.randn(2, 1, 5, RANK, generator=g), torch.randn(2, 1, 5, ROPE, generator=g), i)
    rows = [cache_to_kv(cache, 5, batch_index=b, latent_split=RANK) for b in range(2)]
    assert tuple(rows[0].shape) == (2, 1, 5, 1, RANK + ROPE)
    src = LayerwiseKV(rows, torch.device("cpu"), latent_split=RANK)
    for i in range(2):
        k, v = src.take(i)
        assert torch.equal(k, cache.layers[i].keys) and torch.equal(v, cache.layers[i].values)
    with pytest.raises(LayoutError, match="MLA latent cache needs"):
        cache_to_kv(cache, 5, latent_split=RANK - 1)
    with pytest.raises(LayoutError, match="pass latent_split"):
        cache_to_kv(cache, 5)


@pytest.mark.gpu
def test_mla_on_cuda_through_the_pinned_chunk_views() -> None:
    """On CUDA the prefix comes from the pinned pool layer-group by layer-group
    (``ChunkedLayerwiseKV``), split back into the latent's two halves."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _v3().cuda()
    ids = random_ids(40, vocab=256).cuda()
    ref = full_logits(model, ids)
    from kvtier import CacheEngine, Config

    with CacheEngine(Config.load(env={}, chunk_tokens=8, cpu__max_bytes="256MiB")) as engine:
        kvt.prefill(model, ids, engine)
        again = kvt.prefill(model, ids, engine)
        assert again.hit_tokens == 39
        assert (again.logits - ref).abs().max() < 1e-4
