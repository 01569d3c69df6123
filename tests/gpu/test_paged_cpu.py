"""CPU (CI) tests of the paged gather/scatter fallback, layouts, the paged store/retrieve functions and RoPE re-rotation."""

from __future__ import annotations

import pytest
import torch
from tests.gpu.helpers import (
    LAYOUTS,
    FakeEngine,
    bits_equal,
    block_table_slots,
    finite_,
    make_caches,
    random_bits,
    ref_gather,
    ref_token,
)

from kvtier.transfer.kernels import gather, scatter
from kvtier.transfer.kernels.host import pieces
from kvtier.transfer.layout import LayoutError, LayoutKind, detect_layout
from kvtier.transfer.paged import retrieve_paged, retrieve_paged_layerwise, store_paged, store_paged_layerwise
from kvtier.transfer.rope import apply_rope, rerotate

L, NB, BS, H, D = 3, 12, 8, 2, 16


def _caches(kind: str, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    caches, kw = make_caches(kind, L, NB, BS, H, D, dtype, "cpu", g)
    return caches, kw, g


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("num_tokens", [1, 8, 21])
def test_gather_matches_reference(kind: str, num_tokens: int) -> None:
    caches, kw, g = _caches(kind, seed=num_tokens)
    slots = block_table_slots(NB, BS, num_tokens, g)
    out = gather(caches, torch.tensor(slots), **kw)
    assert bits_equal(out, ref_gather(kind, caches, slots, BS))


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_scatter_writes_only_the_slots(kind: str, dtype: torch.dtype) -> None:
    caches, kw, g = _caches(kind, seed=3, dtype=dtype)
    before = [tuple(t.clone() for t in e) if isinstance(e, tuple) else e.clone() for e in caches]
    slots = block_table_slots(NB, BS, 19, g)
    src = random_bits(tuple(gather(caches, torch.tensor(slots), **kw).shape), dtype, "cpu", g)
    scatter(caches, torch.tensor(slots), src, **kw)
    assert bits_equal(gather(caches, torch.tensor(slots), **kw), src)
    untouched = sorted(set(range(NB * BS)) - set(slots))
    for layer in range(L):
        for s in untouched:
            assert bits_equal(ref_token(kind, caches[layer], s, BS), ref_token(kind, before[layer], s, BS))


@pytest.mark.parametrize(
    ("kind", "shape", "hints", "want"),
    [
        ("nhd", (2, 5, 16, 4, 8), {}, LayoutKind.VLLM_NHD),
        ("hnd_by_hint", (2, 5, 4, 16, 8), {"num_kv_heads": 4}, LayoutKind.VLLM_HND),
        ("mla", (5, 16, 576), {}, LayoutKind.MLA),
        ("vec_hd", (5, 4, 16, 16), {"head_dim": 8}, LayoutKind.VLLM_CPU_VEC),
        ("vec_bs", (5, 4, 32, 8), {"block_size": 16}, LayoutKind.VLLM_CPU_VEC),
    ],
)
def test_detect_layout(kind: str, shape: tuple[int, ...], hints: dict[str, int], want: LayoutKind) -> None:
    lay = detect_layout(torch.empty(shape), **hints)  # type: ignore[arg-type]
    assert lay.kind is want
    if want is LayoutKind.VLLM_CPU_VEC:
        assert (lay.block_size, lay.head_dim) == (16, 8)


@pytest.mark.parametrize(
    ("entry", "hints", "match"),
    [
        (torch.empty(4, 4), {}, "unknown KV layout"),
        (torch.empty(3, 5, 4, 4, 4), {}, "unknown KV layout"),
        (torch.empty(5, 4, 16, 16), {}, "needs head_dim= or block_size="),
        (torch.empty(2, 5, 16, 4, 8), {"num_kv_heads": 3}, "fits neither NHD nor HND"),
        (torch.empty(2, 5, 16, 4, 8), {"head_dim": 7}, "head_dim=8, but head_dim=7"),
        (torch.empty(5, 16, 576), {"kind": "vllm_nhd"}, "does not fit kind"),
        ((torch.empty(1, 2, 3, 4), torch.empty(1, 2, 3, 5)), {}, "hf keys/values differ"),
    ],
)
def test_bad_layouts_are_named(entry: object, hints: dict[str, object], match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        detect_layout(entry, **hints)  # type: ignore[arg-type]


def test_bad_inputs_rejected_with_clear_errors() -> None:
    caches, _, _ = _caches("vllm_nhd", seed=1)
    ok = torch.tensor([0, 5, 9])
    with pytest.raises(TypeError, match="slot_mapping must be int64"):
        gather(caches, ok.float())
    with pytest.raises(ValueError, match="1-D"):
        gather(caches, ok[None])
    with pytest.raises(ValueError, match="out of range"):
        gather(caches, torch.tensor([0, NB * BS]))
    with pytest.raises(ValueError, match="out of range"):
        gather(caches, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="layer 2 differs"):
        gather([*caches[:2], torch.empty(2, NB + 1, BS, H, D)], ok)
    with pytest.raises(ValueError, match="layer 1 differs"):
        gather([caches[0], caches[1].double()], ok)
    with pytest.raises(ValueError, match="empty"):
        gather([], ok)
    with pytest.raises(TypeError, match="not a single tensor"):
        gather(caches[0], ok)  # type: ignore[arg-type]
    src = gather(caches, ok)
    with pytest.raises(TypeError, match="dtype"):
        scatter(caches, ok, src.half())
    with pytest.raises(ValueError, match="expected"):
        scatter(caches, ok, src[:, :, :2])
    with pytest.raises(ValueError, match="mode"):
        gather(caches, ok, mode="fast")
    with pytest.raises(ValueError, match="triton backend unavailable"):
        gather(caches, ok, backend="triton")


def test_gather_into_strided_prefix_out() -> None:
    """A token-range slice of a longer chunk (what retrieve returns on a partial hit) is accepted."""
    caches, _, g = _caches("vllm_nhd", seed=5)
    slots = torch.tensor(block_table_slots(NB, BS, 10, g))
    big = torch.zeros(L, 2, 16, H, D)
    gather(caches, slots, out=big[:, :, :10])
    assert bits_equal(big[:, :, :10], gather(caches, slots))


@pytest.mark.parametrize(
    ("n_rows", "n_t", "piece"), [(6, 100, 64 * 40), (6, 5, 64 * 12), (3, 7, 1), (4, 9, 10**9)]
)
@pytest.mark.parametrize("packed", [True, False])
def test_pieces_cover_everything_once(n_rows: int, n_t: int, piece: int, packed: bool) -> None:
    seen = torch.zeros(n_rows, n_t, dtype=torch.int32)
    for r0, nr, t0, nt in pieces(n_rows, n_t, 16, 4, piece, packed):
        assert nr == 1 or (t0 == 0 and nt == n_t and packed)
        seen[r0 : r0 + nr, t0 : t0 + nt] += 1
    assert bool((seen == 1).all())


PagedFake = FakeEngine  # the paged functions take any engine-like object


@pytest.mark.parametrize("kind", ["vllm_nhd", "vllm_hnd", "hf", "mla", "vllm_cpu_vec"])
def test_store_paged_then_retrieve_paged_round_trip(kind: str) -> None:
    src, kw, g = _caches(kind, seed=11)
    tokens = list(range(100, 123))
    slots_a = torch.tensor(block_table_slots(NB, BS, len(tokens), g))
    eng = PagedFake()
    assert store_paged(eng, tokens, src, slots_a, **kw) == len(tokens)
    dst, _, _ = _caches(kind, seed=12)
    slots_b = torch.tensor(block_table_slots(NB, BS, len(tokens), g))
    assert retrieve_paged(eng, tokens, dst, slots_b, **kw) == len(tokens)
    assert bits_equal(gather(dst, slots_b, **kw), gather(src, slots_a, **kw))


def test_retrieve_paged_partial_hit_fills_only_the_prefix() -> None:
    src, _, g = _caches("vllm_nhd", seed=13)
    tokens = list(range(20))
    slots = torch.tensor(block_table_slots(NB, BS, 20, g))
    eng = PagedFake(max_hit=13)
    store_paged(eng, tokens, src, slots)
    dst, _, _ = _caches("vllm_nhd", seed=14)
    before = gather(dst, slots)
    assert retrieve_paged(eng, tokens, dst, slots) == 13
    after = gather(dst, slots)
    assert bits_equal(after[:, :, :13], gather(src, slots[:13]))
    assert bits_equal(after[:, :, 13:], before[:, :, 13:])
    assert retrieve_paged(PagedFake(), tokens, dst, slots) == 0
    with pytest.raises(ValueError, match="one slot per token"):
        retrieve_paged(eng, tokens, dst, slots[:5])


def test_layerwise_variants_match_the_bulk_ones() -> None:
    src, _, g = _caches("vllm_hnd", seed=15)
    tokens = list(range(17))
    slots = torch.tensor(block_table_slots(NB, BS, 17, g))
    eng = PagedFake()
    gen = store_paged_layerwise(eng, tokens, src, slots, layout="vllm_hnd")
    assert list(gen) == list(range(L))
    assert eng.kv is not None and bits_equal(eng.kv, gather(src, slots, layout="vllm_hnd"))
    dst, _, _ = _caches("vllm_hnd", seed=16)
    load = retrieve_paged_layerwise(eng, tokens, dst, slots, layout="vllm_hnd")
    assert load.num_tokens == 17
    for layer in load:  # layer i is in place when yielded; later layers not yet
        got = gather(dst, slots, layout="vllm_hnd")
        assert bits_equal(got[layer], eng.kv[layer])
        if layer + 1 < L:
            assert not bits_equal(got[layer + 1], eng.kv[layer + 1])


def test_with_the_real_cache_engine() -> None:
    from kvtier import CacheEngine, Config

    eng = CacheEngine(Config.load(env={}, chunk_tokens=8, cpu__max_bytes="8MiB"))
    src, _, g = _caches("vllm_nhd", seed=17)
    finite_(src)  # the engine does not store NaN/Inf
    tokens = torch.arange(1000, 1021)
    slots = torch.tensor(block_table_slots(NB, BS, 21, g))
    assert store_paged(eng, tokens, src, slots) == 21
    dst, _, _ = _caches("vllm_nhd", seed=18)
    slots_b = torch.tensor(block_table_slots(NB, BS, 21, g))
    assert retrieve_paged(eng, tokens, dst, slots_b) == 21
    assert bits_equal(gather(dst, slots_b), gather(src, slots))
    load = retrieve_paged_layerwise(eng, tokens, dst, slots_b)
    assert load.num_tokens == 21 and list(load) == list(range(L))


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rerotate_equals_rope_from_scratch(theta: float) -> None:
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 40, 3, 64, generator=g, dtype=torch.float64)
    old = torch.randint(0, 4000, (40,), generator=g)
    new = torch.randint(0, 4000, (40,), generator=g)
    cached = apply_rope(raw.float(), old, theta)
    moved = rerotate(cached, old, new, theta)
    truth = apply_rope(raw, new, theta)  # float64 from scratch
    err = (moved.double() - truth).norm() / truth.norm()
    assert err < 2e-6, err
    assert bits_equal(rerotate(cached, old, old, theta), cached)  # delta 0 is the identity


def test_rerotate_rejects_bad_inputs() -> None:
    k = torch.randn(5, 2, 8)
    pos = torch.arange(5)
    with pytest.raises(ValueError, match="expected"):
        rerotate(k, pos[:4], pos)
    with pytest.raises(TypeError, match="int32/int64"):
        rerotate(k, pos.float(), pos)
    with pytest.raises(ValueError, match="even head_dim"):
        rerotate(torch.randn(5, 2, 7), pos, pos)
