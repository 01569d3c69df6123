"""kvtier.integrations.transformers against fresh full prefills: misses, partial and full hits.

Every check compares a cache-loaded run with a fresh full prefill of the same prompt on the same
model: fp32 logits within 1e-4, greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine, random_ids

from kvtier import CacheEngine
from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_cache import IntegrationError, cache_to_kv, model_kv_spec
from kvtier.models import LoadedModel, load_model

ATOL = 1e-4


@torch.inference_mode()
def greedy_continue(model, r: kvt.PrefillResult, n: int) -> list[int]:
    """Greedy tokens from a prefill result, decoding step by step on its cache."""
    tok = r.next_token
    out = [int(tok)]
    cache = r.cache
    for _ in range(n - 1):
        logits = model(input_ids=tok, **{kvt.cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out.append(int(tok))
    return out


@torch.inference_mode()
def reference_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """``model.generate``'s greedy tokens (it may stop early at EOS)."""
    seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return seq[0, ids.shape[1] :].tolist()


def same_greedy(model, r: kvt.PrefillResult, ids: torch.Tensor, n: int) -> bool:
    want = reference_greedy(model, ids, n)
    return greedy_continue(model, r, n)[: len(want)] == want


def test_miss_partial_full_hit_random_models(random_model: LoadedModel, engine: CacheEngine) -> None:
    model = random_model.model
    base = random_ids(70, seed=1)
    longer = torch.cat([base, random_ids(25, seed=2)], dim=1)

    miss = kvt.prefill(model, base, engine)
    assert miss.hit_tokens == 0 and miss.stored_tokens == 70
    torch.testing.assert_close(miss.logits, full_logits(model, base), atol=ATOL, rtol=0)

    full = kvt.prefill(model, base, engine)  # the whole prompt is cached: all but the last token reused
    assert full.hit_tokens == 69
    torch.testing.assert_close(full.logits, full_logits(model, base), atol=ATOL, rtol=0)
    assert same_greedy(model, full, base, 6)

    partial = kvt.prefill(model, longer, engine)  # 64 tokens = 4 full 16-token chunks reused
    assert partial.hit_tokens == 64
    torch.testing.assert_close(partial.logits, full_logits(model, longer), atol=ATOL, rtol=0)
    assert same_greedy(model, partial, longer, 6)
    # the cache after a hit holds the same KV as a fresh prefill's (not just the same logits)
    fresh = kvt.prefill(model, longer, make_engine(), store=False)
    torch.testing.assert_close(
        cache_to_kv(partial.cache, 95), cache_to_kv(fresh.cache, 95), atol=ATOL, rtol=0
    )


def test_generate_drop_in_matches_model_generate(random_model: LoadedModel, engine: CacheEngine) -> None:
    model = random_model.model
    ids = random_ids(50, seed=3)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    first = kvt.generate(model, ids, engine, max_new_tokens=8, do_sample=False, store_generated=True)
    assert torch.equal(first, want)
    assert (
        engine.lookup(first[0, :57], extras=kvt.request_extras(model)) == 57
    )  # prompt + 7 generated tokens stored
    again = kvt.generate(model, ids, engine, max_new_tokens=8, do_sample=False)
    assert torch.equal(again, want)
    assert engine.stats().hit_tokens >= 50


def test_smollm2_real_weights(smollm2: LoadedModel, engine: CacheEngine) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    system = "You are a helpful assistant. Answer briefly and precisely. " * 4
    q1 = tok(system + "Question: What is the capital of France? Answer:", return_tensors="pt").input_ids
    q2 = tok(
        system + "Question: What is the largest planet in the solar system? Answer:", return_tensors="pt"
    ).input_ids
    shared = int((q1[0, : q2.shape[1]] == q2[0, : q1.shape[1]]).cumprod(0).sum())
    assert shared >= 32

    miss = kvt.prefill(model, q1, engine)
    assert miss.hit_tokens == 0
    torch.testing.assert_close(miss.logits, full_logits(model, q1), atol=ATOL, rtol=0)
    full = kvt.prefill(model, q1, engine)
    assert full.hit_tokens == q1.shape[1] - 1
    torch.testing.assert_close(full.logits, full_logits(model, q1), atol=ATOL, rtol=0)
    assert same_greedy(model, full, q1, 5)

    partial = kvt.prefill(model, q2, engine)  # shares the system prompt's whole chunks with q1
    assert partial.hit_tokens == shared // 16 * 16
    torch.testing.assert_close(partial.logits, full_logits(model, q2), atol=ATOL, rtol=0)
    assert same_greedy(model, partial, q2, 5)
    assert torch.equal(
        kvt.generate(model, q2, engine, max_new_tokens=5, do_sample=False),
        model.generate(q2, attention_mask=torch.ones_like(q2), max_new_tokens=5, do_sample=False),
    )
    france = tok("The capital of France is", return_tensors="pt").input_ids
    for _ in range(2):  # a miss, then a hit: real weights give the real answer either way
        assert "Paris" in tok.decode(
            kvt.generate(model, france, engine, max_new_tokens=3, do_sample=False)[0]
        )


def test_kv_of_another_model_is_a_miss(engine: CacheEngine) -> None:
    """Two checkpoints of one architecture, and one model in two dtypes, share tiers: never each other's KV."""
    a = load_model("random:llama-tiny").model
    b = load_model("random:llama-tiny").model
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)  # a fine-tune under the same name
    ids = random_ids(40, seed=4)
    kvt.prefill(a, ids, engine)
    other = CacheEngine(engine.config, tiers=engine.storage.tiers)  # same tiers, own namespace
    assert model_kv_spec(a).model_id != model_kv_spec(b).model_id
    r = kvt.prefill(b, ids, other)
    assert r.hit_tokens == 0
    torch.testing.assert_close(r.logits, full_logits(b, ids), atol=ATOL, rtol=0)

    a16 = load_model("random:llama-tiny", dtype=torch.bfloat16).model
    third = CacheEngine(engine.config, tiers=engine.storage.tiers)
    r16 = kvt.prefill(a16, ids, third)
    assert r16.hit_tokens == 0
    assert third.namespace is not None and third.namespace.kv_dtype == "bfloat16"


def test_engine_bound_to_another_model_is_bypassed(caplog: pytest.LogCaptureFixture) -> None:
    a = load_model("random:llama-tiny").model
    b = load_model("random:qwen2-tiny").model
    eng = make_engine()
    ids = random_ids(40, seed=5)
    kvt.prefill(a, ids, eng)
    r = kvt.prefill(b, ids, eng)  # engine is bound to model a: b neither reads nor writes it
    assert r.hit_tokens == 0 and r.stored_tokens == 0
    assert "cache is bypassed" in caplog.text
    torch.testing.assert_close(r.logits, full_logits(b, ids), atol=ATOL, rtol=0)
    out = kvt.generate(b, ids, eng, max_new_tokens=3, do_sample=False)
    assert torch.equal(
        out, b.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    )


def test_batches_of_equal_rows_and_padding_refused(engine: CacheEngine) -> None:
    model = load_model("random:llama-tiny").model
    prefix = random_ids(48, seed=6)
    rows = torch.cat(
        [torch.cat([prefix, random_ids(10, seed=7)], 1), torch.cat([prefix, random_ids(10, seed=8)], 1)]
    )
    kvt.prefill(model, prefix, engine)
    r = kvt.prefill(model, rows, engine)
    assert r.hit_tokens == 48 and r.logits.shape[0] == 2
    for b in range(2):
        torch.testing.assert_close(
            r.logits[b : b + 1], full_logits(model, rows[b : b + 1]), atol=ATOL, rtol=0
        )
    mask = torch.ones_like(rows)
    mask[1, 0] = 0
    with pytest.raises(NotImplementedError, match="padded"):
        kvt.prefill(model, rows, engine, attention_mask=mask)


def test_bad_inputs_name_the_problem(engine: CacheEngine) -> None:
    model = load_model("random:tiny").model
    with pytest.raises(IntegrationError, match="input_ids"):
        kvt.prefill(model, torch.zeros(1, 0, dtype=torch.long), engine)
    with pytest.raises(IntegrationError, match="past_key_values"):
        kvt.generate(model, random_ids(5), engine, past_key_values=object())
    one = kvt.prefill(model, random_ids(1), engine)  # a single token: nothing to reuse, still stored
    assert one.hit_tokens == 0 and one.stored_tokens == 1


def test_layerwise_cache_from_host_rows_matches(engine: CacheEngine) -> None:
    """KVTierCache fed from host rows (the path that copies layer i+1 while layer i computes on CUDA)."""
    from kvtier.integrations.hf_cache import KVTierCache, LayerwiseKV

    model = load_model("random:llama-tiny").model
    ids = random_ids(40, seed=9)
    ref = kvt.prefill(model, ids, engine)
    kv = cache_to_kv(ref.cache, 39)
    cache = KVTierCache(model.config, LayerwiseKV([kv], torch.device("cpu")))
    assert cache.get_seq_length() == 39  # reported before any layer is installed
    with torch.inference_mode():
        logits = model(input_ids=ids[:, 39:], **{kvt.cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(logits, full_logits(model, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(cache_to_kv(cache, 39), kv, atol=0, rtol=0)  # the prefix: bit-exact
    torch.testing.assert_close(cache_to_kv(cache, 40), cache_to_kv(ref.cache, 40), atol=ATOL, rtol=0)


@pytest.mark.gpu
def test_layerwise_cache_cuda_side_stream() -> None:
    """On CUDA, host (pinned) rows are copied per layer on a side stream, ordered by events."""
    from kvtier.integrations.hf_cache import KVTierCache, LayerwiseKV

    model = load_model("random:llama-tiny", device="cuda", dtype=torch.float32).model
    ids = random_ids(300, seed=10).cuda()
    eng = make_engine()
    ref = kvt.prefill(model, ids, eng)
    kv = cache_to_kv(ref.cache, 299).cpu().pin_memory()
    cache = KVTierCache(model.config, LayerwiseKV([kv], torch.device("cuda")))
    with torch.inference_mode():
        logits = model(input_ids=ids[:, 299:], **{kvt.cache_kwarg(model): cache}, use_cache=True).logits[
            :, -1
        ]
    torch.testing.assert_close(logits, full_logits(model, ids), atol=ATOL, rtol=0)
    full = kvt.prefill(model, ids, eng)
    assert full.hit_tokens == 299
    torch.testing.assert_close(full.logits, full_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.gpu
def test_chunk_views_load_on_cuda_matches_and_releases_pins() -> None:
    """On CUDA the prefix goes pool -> GPU layer by layer from pinned chunk views, then unpins."""
    model = load_model("random:llama-tiny", device="cuda", dtype=torch.float32).model
    eng = make_engine()
    ids = random_ids(100, seed=11).cuda()
    kvt.prefill(model, ids, eng)
    longer = torch.cat([ids, random_ids(30, seed=12).cuda()], dim=1)
    r = kvt.prefill(model, longer, eng)
    assert r.hit_tokens >= 64
    torch.testing.assert_close(r.logits, full_logits(model, longer), atol=ATOL, rtol=0)
    assert same_greedy(model, r, longer, 5)
    cpu = eng.storage.tiers[0]
    assert not any(e.obj.pinned for e in cpu._entries.values())  # type: ignore[attr-defined]
