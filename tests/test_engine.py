from __future__ import annotations

import pytest
import torch
from tests.conftest import DIM, HEADS, LAYERS, make_kv, make_tokens

from kvtier import CacheEngine, Config, KVError
from kvtier.keys import Namespace


def test_store_then_retrieve_is_bit_identical(engine: CacheEngine) -> None:
    tokens, kv = make_tokens(100), make_kv(100)
    assert engine.lookup(tokens) == 0
    assert engine.store(tokens, kv) == 100
    assert engine.lookup(tokens) == 100
    r = engine.retrieve(tokens)
    assert r.num_tokens == 100 and r.kv is not None
    assert torch.equal(r.kv, kv) and r.num_chunks == 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_round_trip(dtype: torch.dtype) -> None:
    eng = CacheEngine(Config.load(env={}, chunk_tokens=16, cpu__max_bytes="8MiB"))
    tokens, kv = make_tokens(40), make_kv(40, dtype=dtype)
    eng.store(tokens, kv)  # binds the namespace from kv
    r = eng.retrieve(tokens)
    assert r.kv is not None and r.kv.dtype == dtype and torch.equal(r.kv, kv)


def test_partial_hit_returns_the_shared_prefix(engine: CacheEngine) -> None:
    tokens, kv = make_tokens(64), make_kv(64)
    engine.store(tokens, kv)
    longer = torch.cat([tokens, make_tokens(30, seed=9)])
    assert engine.lookup(longer) == 64
    r = engine.retrieve(longer)
    assert r.num_tokens == 64 and r.kv is not None and torch.equal(r.kv, kv)
    changed = tokens.clone()
    changed[40] += 1  # diverges inside chunk 2 (tokens 32..47)
    assert engine.lookup(changed) == 32


def test_partial_tail_chunk_is_stored_and_superseded(engine: CacheEngine) -> None:
    tokens, kv = make_tokens(40), make_kv(40)
    engine.store(tokens, kv)
    assert engine.lookup(tokens) == 40
    longer = torch.cat([tokens, make_tokens(8, seed=3)])
    assert engine.lookup(longer) == 32  # the 8-token tail chunk's key does not cover 16 tokens


def test_a_hole_ends_the_prefix(engine: CacheEngine) -> None:
    tokens, kv = make_tokens(64), make_kv(64)
    engine.store(tokens, kv)
    keys = engine.keys(tokens)
    engine.storage.remove(keys[1].digest)
    assert engine.lookup(tokens) == 16
    r = engine.retrieve(tokens)
    assert r.num_tokens == 16 and r.kv is not None and torch.equal(r.kv, kv[:, :, :16])


def test_corrupted_chunk_is_a_miss_not_wrong_kv(engine: CacheEngine) -> None:
    tokens, kv = make_tokens(48), make_kv(48)
    engine.store(tokens, kv)
    cpu = engine.storage.tiers[0]
    key = engine.keys(tokens)[1].digest
    entry = cpu._entries[key]  # type: ignore[attr-defined]
    entry.fingerprint = b"\x00" * 8  # as if a value were filed under the wrong key
    r = engine.retrieve(tokens)
    assert r.num_tokens == 16 and r.kv is not None and torch.equal(r.kv, kv[:, :, :16])
    assert engine.stats().fingerprint_mismatches == 1


@pytest.mark.parametrize(
    "kv,match",
    [
        (make_kv(10)[0], "shape"),
        (make_kv(11), "11 tokens"),
        (make_kv(10, layers=LAYERS + 1), "namespace"),
        (make_kv(10, heads=HEADS * 2), "namespace"),
        (make_kv(10, dtype=torch.float16), "dtype"),
        (make_kv(10).to(torch.int32), "floating"),
        ("not a tensor", "torch.Tensor"),
    ],
)
def test_bad_input_raises_and_leaves_cache_unchanged(engine: CacheEngine, kv: object, match: str) -> None:
    tokens = make_tokens(10)
    with pytest.raises(KVError, match=match):
        engine.store(tokens, kv)  # type: ignore[arg-type]
    assert engine.lookup(tokens) == 0
    assert engine.stats().tiers["cpu"].chunks == 0


def test_other_namespace_never_sees_the_kv() -> None:
    cpu_cfg = Config.load(env={}, chunk_tokens=16, cpu__max_bytes="8MiB")
    tiers_engine = CacheEngine(cpu_cfg, namespace=Namespace("model-a", "float32", (LAYERS, HEADS, DIM)))
    tokens = make_tokens(32)
    tiers_engine.store(tokens, make_kv(32))
    other = CacheEngine(
        cpu_cfg,
        namespace=Namespace("model-b", "float32", (LAYERS, HEADS, DIM)),
        tiers=tiers_engine.storage.tiers,
    )
    assert other.lookup(tokens) == 0 and other.retrieve(tokens).num_tokens == 0
    salted = CacheEngine(
        cpu_cfg,
        namespace=Namespace("model-a", "float32", (LAYERS, HEADS, DIM), cache_salt="t2"),
        tiers=tiers_engine.storage.tiers,
    )
    assert salted.lookup(tokens) == 0


def test_eviction_under_capacity_keeps_a_valid_prefix() -> None:
    chunk_bytes = LAYERS * 2 * 16 * HEADS * DIM * 4
    eng = CacheEngine(Config.load(env={}, chunk_tokens=16, cpu__max_bytes=chunk_bytes * 4))
    eng.bind_model(LAYERS, HEADS, DIM, torch.float32)
    for i in range(6):
        eng.store(make_tokens(32, seed=i), make_kv(32, seed=i))
    s = eng.stats()
    assert s.tiers["cpu"].chunks == 4 and s.evictions == 8
    for i in range(6):
        t = make_tokens(32, seed=i)
        r = eng.retrieve(t)
        assert r.num_tokens in (0, 16, 32)
        if r.kv is not None:
            assert torch.equal(r.kv, make_kv(32, seed=i)[:, :, : r.num_tokens])
    assert eng.lookup(make_tokens(32, seed=5)) == 32  # most recent survives under LRU


def test_stats_count_hits(engine: CacheEngine) -> None:
    tokens = make_tokens(64)
    engine.lookup(tokens)
    engine.store(tokens, make_kv(64))
    engine.lookup(tokens)
    s = engine.stats()
    assert s.lookups == 2 and s.lookup_tokens == 128 and s.hit_tokens == 64
    assert s.hit_rate == pytest.approx(0.5) and s.request_hit_rate == pytest.approx(0.5)
    assert s.tiers["cpu"].bytes_used >= 64 * LAYERS * 2 * HEADS * DIM * 4
    text = engine.metrics.render().decode()
    assert "kvtier_hit_tokens_total 64.0" in text and 'kvtier_tier_chunks{tier="cpu"} 4.0' in text


def test_unbound_engine_misses() -> None:
    eng = CacheEngine(Config.load(env={}, cpu__max_bytes="1MiB"))
    assert eng.lookup([1, 2, 3]) == 0 and eng.retrieve([1, 2, 3]).kv is None


def test_rebinding_to_another_namespace_is_refused(engine: CacheEngine) -> None:
    with pytest.raises(KVError, match="already bound"):
        engine.bind_model(LAYERS + 1, HEADS, DIM, torch.float32)


def test_retrieve_into_preallocated_out(engine: CacheEngine) -> None:
    tokens, kv = make_tokens(40), make_kv(40)
    engine.store(tokens, kv)
    out = torch.full((LAYERS, 2, 64, HEADS, DIM), 7.0)
    r = engine.retrieve(tokens, out=out)
    assert r.num_tokens == 40 and r.kv is not None and r.kv.data_ptr() == out.data_ptr()
    assert torch.equal(out[:, :, :40], kv) and torch.all(out[:, :, 40:] == 7.0)
    with pytest.raises(KVError, match="out must have shape"):
        engine.retrieve(tokens, out=torch.empty(LAYERS, 2, 8, HEADS, DIM))
    with pytest.raises(KVError, match="dtype"):
        engine.retrieve(tokens, out=torch.empty(LAYERS, 2, 40, HEADS, DIM, dtype=torch.float16))


def test_mla_single_plane_round_trip() -> None:
    eng = CacheEngine(Config.load(env={}, chunk_tokens=16, cpu__max_bytes="8MiB"))
    tokens = make_tokens(40)
    latent = torch.randn(3, 1, 40, 1, 24)  # [layers, 1 plane, tokens, 1, latent]
    eng.store(tokens, latent)
    assert eng.namespace is not None and eng.namespace.kv_planes == 1
    r = eng.retrieve(tokens)
    assert r.kv is not None and torch.equal(r.kv, latent)
    with pytest.raises(KVError, match="namespace"):
        eng.store(tokens, torch.randn(3, 2, 40, 1, 24))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_kv_is_counted_warned_once_and_not_stored(
    engine: CacheEngine, caplog: pytest.LogCaptureFixture, bad: float
) -> None:
    """Issue 22 #8: NaN/Inf KV means the engine computed garbage. The clean chunks before it are
    stored; from the first non-finite chunk on nothing is (later chunks attended to it), so a
    transient fault is never served to later requests. Counted, one warning per engine."""
    tokens, kv = make_tokens(64), make_kv(64)
    kv[1, 0, 37, 0, 3] = bad  # inside chunk 2 (tokens 32..47)
    with caplog.at_level("WARNING"):
        res = engine.store_range(tokens, kv)
        assert res.stored_tokens == 32 and res.nonfinite_chunks == 2
        assert engine.lookup(tokens) == 32
        other = make_tokens(64, seed=5)
        assert engine.store(other, kv) == 32  # a second bad store: counted again, no new warning
    assert engine.stats().nonfinite_chunks == 4
    assert caplog.text.count("NaN/Inf") == 1
    assert "kvtier_nonfinite_chunks_total 4.0" in engine.metrics.render().decode()


@pytest.mark.parametrize(("dtype", "value"), [(torch.float16, 60000.0), (torch.float32, 3e38)])
def test_large_finite_kv_is_stored(dtype: torch.dtype, value: float) -> None:
    """Values whose sum overflows (in their dtype, or in float32) are still finite: stored."""
    eng = CacheEngine(Config.load(env={}, chunk_tokens=16, cpu__max_bytes="8MiB"))
    kv = torch.full((LAYERS, 2, 32, HEADS, DIM), value, dtype=dtype)
    assert eng.store(make_tokens(32), kv) == 32 and eng.stats().nonfinite_chunks == 0


def test_nonfinite_pages_are_not_stored(engine: CacheEngine) -> None:
    """Engine-named pages (SGLang) are refused the same way: from the first non-finite page on."""
    engine.bind_model(LAYERS, HEADS, DIM, torch.float32)
    pages = [make_kv(16, seed=i) for i in range(3)]
    pages[1][0, 1, 3, 0, 0] = float("nan")
    digests = engine.page_digests(["p0", "p1", "p2"])
    assert engine.store_pages(digests, pages) == [True, False, False]
    assert engine.lookup_pages(digests, 16) == 1 and engine.stats().nonfinite_chunks == 2
