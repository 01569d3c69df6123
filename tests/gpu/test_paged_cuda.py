"""CUDA tests: Triton kernels bit-exact against the torch reference, host paths, mixin, RoPE."""

from __future__ import annotations

import pytest
import torch
from tests.gpu.helpers import (
    FakeEngine,
    bits_equal,
    block_table_slots,
    finite_,
    make_caches,
    random_bits,
    ref_gather,
)

from kvtier.transfer.kernels import gather, scatter
from kvtier.transfer.kernels.ops import prepare
from kvtier.transfer.paged import retrieve_paged, retrieve_paged_layerwise, store_paged, store_paged_layerwise
from kvtier.transfer.rope import apply_rope, rerotate, rerotate_reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]
KINDS = ["vllm_nhd", "vllm_hnd", "vllm_nhd_permuted", "hf", "mla"]
L, NB, BS, H, D = 4, 64, 16, 8, 128


def _setup(kind: str, dtype: torch.dtype, seed: int, n_tokens: int = 333, d: int = D):
    g = torch.Generator().manual_seed(seed)
    caches, kw = make_caches(kind, L, NB, BS, H, d if kind != "mla" else 576, dtype, "cuda", g)
    slots = torch.tensor(block_table_slots(NB, BS, n_tokens, g), device="cuda")
    return caches, kw, slots, g


def _clone(caches):
    return [tuple(t.clone() for t in e) if isinstance(e, tuple) else e.clone() for e in caches]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gather_scatter_bit_exact(kind: str, dtype: torch.dtype) -> None:
    caches, kw, slots, g = _setup(kind, dtype, seed=1)
    assert prepare(caches, slots, kw.get("layout")).use_triton
    tri = gather(caches, slots, backend="triton", **kw)
    ref = gather(caches, slots, backend="torch", **kw)
    assert bits_equal(tri, ref)
    assert bits_equal(
        gather(caches, slots[:5], backend="triton", **kw), ref_gather(kind, caches, slots[:5].tolist(), BS)
    )
    src = random_bits(tuple(tri.shape), dtype, "cuda", g)
    a, b = _clone(caches), _clone(caches)
    scatter(a, slots, src, backend="triton", **kw)
    scatter(b, slots, src, backend="torch", **kw)
    for x, y in zip(a, b):
        for tx, ty in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,)):
            assert bits_equal(tx, ty)


@pytest.mark.parametrize("d", [64, 96, 80])
def test_odd_head_dims_and_unaligned_layouts(d: int) -> None:
    caches, kw, slots, _ = _setup("vllm_hnd", torch.bfloat16, seed=2, n_tokens=77, d=d)
    assert bits_equal(
        gather(caches, slots, backend="triton", **kw), gather(caches, slots, backend="torch", **kw)
    )


@pytest.mark.parametrize("mode", ["zero_copy", "staging"])
@pytest.mark.parametrize("kind", ["vllm_nhd", "vllm_hnd", "mla"])
def test_host_paths(mode: str, kind: str) -> None:
    caches, kw, slots, g = _setup(kind, torch.bfloat16, seed=3, n_tokens=1000)
    ref = gather(caches, slots, **kw)
    host = gather(caches, slots, device="cpu", mode=mode, staging_bytes=100_000, **kw)
    torch.cuda.synchronize()
    assert host.is_pinned() and bits_equal(host, ref)
    src = random_bits(tuple(ref.shape), torch.bfloat16, "cpu", g).pin_memory()
    a, b = _clone(caches), _clone(caches)
    scatter(a, slots, src, mode=mode, staging_bytes=100_000, **kw)
    scatter(b, slots, src.cuda(), **kw)
    torch.cuda.synchronize()
    for x, y in zip(a, b):
        assert bits_equal(x, y)  # type: ignore[arg-type]


def test_cpu_vec_layout_on_cuda_uses_the_torch_path() -> None:
    caches, kw, slots, _ = _setup("vllm_cpu_vec", torch.bfloat16, seed=4, n_tokens=50)
    assert not prepare(caches, slots, kw["layout"]).use_triton
    assert bits_equal(
        gather(caches, slots, **kw), ref_gather("vllm_cpu_vec", caches, slots.tolist(), BS).cuda()
    )


PagedFake = FakeEngine  # the paged functions take any engine-like object


def test_mixin_on_cuda_bulk_and_layerwise() -> None:
    src, _, slots, _ = _setup("vllm_nhd", torch.bfloat16, seed=5, n_tokens=300)
    tokens = list(range(300))
    eng = PagedFake()
    assert store_paged(eng, tokens, src, slots) == 300
    dst, _, slots_b, _ = _setup("vllm_nhd", torch.bfloat16, seed=6, n_tokens=300)
    assert retrieve_paged(eng, tokens, dst, slots_b) == 300
    assert bits_equal(gather(dst, slots_b), gather(src, slots))
    dst2, _, _, _ = _setup("vllm_nhd", torch.bfloat16, seed=7, n_tokens=300)
    load = retrieve_paged_layerwise(eng, tokens, dst2, slots_b)
    assert load.num_tokens == 300 and list(load) == list(range(L))
    assert bits_equal(gather(dst2, slots_b), gather(src, slots))
    eng2 = PagedFake()
    for _ in store_paged_layerwise(eng2, tokens, src, slots):
        pass
    assert eng2.kv is not None and bits_equal(eng2.kv.cuda(), gather(src, slots))


def test_real_cache_engine_on_cuda() -> None:
    from kvtier import CacheEngine, Config

    eng = CacheEngine(Config.load(env={}, chunk_tokens=64, cpu__max_bytes="256MiB"))
    src, _, slots, _ = _setup("vllm_nhd", torch.bfloat16, seed=8, n_tokens=200)
    finite_(src)  # the engine does not store NaN/Inf
    tokens = torch.arange(200)
    assert store_paged(eng, tokens, src, slots) == 200
    dst, _, slots_b, _ = _setup("vllm_nhd", torch.bfloat16, seed=9, n_tokens=200)
    assert retrieve_paged(eng, tokens, dst, slots_b) == 200
    torch.cuda.synchronize()
    assert bits_equal(gather(dst, slots_b), gather(src, slots))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rerotate_triton_matches_reference_and_scratch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 500, 8, 128, generator=g, dtype=torch.float64).cuda()
    old = torch.randint(0, 30000, (500,), generator=g).cuda()
    new = torch.randint(0, 30000, (500,), generator=g).cuda()
    cached = apply_rope(raw, old).to(dtype)
    tri = rerotate(cached, old, new, backend="triton")
    ref = rerotate_reference(cached, old, new)
    truth = apply_rope(raw, new)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(tri, ref) < tol and rel(tri, truth) < tol * 3
