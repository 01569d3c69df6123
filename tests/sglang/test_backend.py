"""kvtier as an SGLang HiCache storage backend, against SGLang's own classes (sglang 0.5.23).

SGLang's ``StorageBackendFactory`` builds the backend from the ``dynamic`` extra config, its
real host pools (MHA and MLA, every layout kvtier supports) hold the pages, and its
``HiCacheStorageFailureInjector`` plays the failing storage. Runs in ``.venv-sglang``
(``make sglang-test``); skipped where sglang is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "sglang.srt.mem_cache.hicache_storage", reason="sglang not installed: run `make sglang-test`"
)

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageFailureInjector,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

sys.path.insert(0, str(Path(__file__).parent))
import pools
from pools import PAGE, fill_random, page_keys, pages, pool, storage_config

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.sglang import KVTierHiCacheStorage, SGLangLayoutError

LAYOUTS = [
    ("mha", "layer_first"),
    ("mha", "page_first"),
    ("mha", "page_first_direct"),
    ("mha", "page_head"),
    ("mla", "layer_first"),
    ("mla", "page_first"),
    ("mla", "page_first_direct"),
]


def engine(tmp_path: Path | None = None) -> CacheEngine:
    disk = {"enabled": True, "path": str(tmp_path)} if tmp_path is not None else {"enabled": False}
    return CacheEngine(Config.from_dict({"cpu": {"max_bytes": 64 << 20, "pin_memory": "no"}, "disk": disk}))


def backend(host_pool: Any, eng: CacheEngine | None = None, **cfg: Any) -> KVTierHiCacheStorage:
    b = KVTierHiCacheStorage(storage_config({}, **cfg), {}, engine=eng or engine())
    b.register_mem_pool_host(host_pool)
    return b


def test_factory_builds_kvtier_from_dynamic_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVTIER_CPU__PIN_MEMORY", "no")
    cfg_file = tmp_path / "kvtier.yaml"
    cfg_file.write_text("cpu:\n  max_bytes: 16777216\n  pin_memory: 'no'\n")
    p = pool("mha", "page_first")
    b = StorageBackendFactory.create_backend("dynamic", storage_config({"kvtier_config": str(cfg_file)}), p)
    assert isinstance(b, KVTierHiCacheStorage) and isinstance(b, HiCacheStorage)
    assert b.engine.config.cpu.max_bytes == 16 << 20
    b.register_mem_pool_host(p)  # what HiCacheController does right after create_backend
    idx = fill_random(p, 3, seed=1)
    keys = page_keys(3)
    assert b.batch_set_v1(keys, idx) == [True] * 3
    assert b.batch_exists(keys) == 3
    b.close()


@pytest.mark.parametrize(("kind", "layout"), LAYOUTS)
def test_set_exists_get_bit_exact(kind: str, layout: str) -> None:
    src, dst = pool(kind, layout), pool(kind, layout)
    eng = engine()
    writer, reader = backend(src, eng, mla=kind == "mla"), backend(dst, eng, mla=kind == "mla")
    idx = fill_random(src, 5, seed=2)
    want = pages(src, idx)
    keys = page_keys(5)
    assert writer.batch_exists(keys) == 0
    assert writer.batch_set_v1(keys, idx) == [True] * 5
    assert reader.batch_exists(keys) == 5 and reader.exists(keys[0])
    out = dst.alloc(5 * PAGE)
    assert out is not None
    assert reader.batch_get_v1(keys, out) == [True] * 5
    for w, got in zip(want, pages(dst, out)):
        assert torch.equal(w.view(torch.int16), got.view(torch.int16))


def test_layouts_share_pages() -> None:
    """A page-first writer and a layer-first reader (two SGLang configs) get the same KV."""
    src, dst = pool("mha", "page_first"), pool("mha", "layer_first")
    eng = engine()
    idx = fill_random(src, 2, seed=3)
    keys = page_keys(2)
    assert backend(src, eng).batch_set_v1(keys, idx) == [True, True]
    out = dst.alloc(2 * PAGE)
    assert backend(dst, eng).batch_get_v1(keys, out) == [True, True]
    for i, o in zip(idx[::PAGE].tolist(), out[::PAGE].tolist()):
        a = src.kv_buffer[:, i : i + PAGE].permute(0, 2, 1, 3, 4)  # page_first -> [2, L, T, H, D]
        b = dst.kv_buffer[:, :, o : o + PAGE]
        assert torch.equal(a, b)


def test_generic_flat_page_path() -> None:
    """Without interface_v1 SGLang calls batch_set/batch_get with flat pages of the pool."""
    src, dst = pool("mha", "page_first"), pool("mha", "page_first")
    eng = engine()
    w, r = backend(src, eng), backend(dst, eng)
    idx = fill_random(src, 3, seed=4)
    keys = page_keys(3)
    assert w.batch_set(keys, pages(src, idx))
    targets = [dst.get_dummy_flat_data_page() for _ in keys]
    got = r.batch_get(keys + page_keys(1, "absent"), [*targets, dst.get_dummy_flat_data_page()])
    assert got[3] is None and all(g is not None for g in got[:3])
    for want, t in zip(pages(src, idx), targets):
        assert torch.equal(want, t)
    assert r.get(page_keys(1, "absent")[0], dst.get_dummy_flat_data_page()) is None


def test_hit_is_a_prefix_and_partial_get() -> None:
    p = pool("mha", "layer_first")
    b = backend(p)
    idx = fill_random(p, 4, seed=5)
    keys = page_keys(4)
    assert b.batch_set_v1(keys[:2], idx[: 2 * PAGE]) == [True, True]
    assert b.batch_exists(keys) == 2
    out = p.alloc(4 * PAGE)
    assert b.batch_get_v1(keys, out) == [True, True, False, False]


def test_namespace_separates_tp_ranks_but_not_mla() -> None:
    eng_mha = engine()
    p0, p1 = pool("mha", "page_first"), pool("mha", "page_first")
    idx = fill_random(p0, 1, seed=6)
    keys = page_keys(1)
    backend(p0, eng_mha, tp_rank=0, tp_size=2).batch_set_v1(keys, idx)
    other = KVTierHiCacheStorage(storage_config({}, tp_rank=1, tp_size=2), {}, engine=_sharing(eng_mha))
    other.register_mem_pool_host(p1)
    assert other.batch_exists(keys) == 0  # another tp shard's heads
    # MLA KV is replicated over tp: rank 1 reads what rank 0 wrote.
    eng_mla = engine()
    m0, m1 = pool("mla", "page_first"), pool("mla", "page_first")
    idx = fill_random(m0, 1, seed=7)
    backend(m0, eng_mla, mla=True, tp_rank=0, tp_size=2).batch_set_v1(keys, idx)
    r = KVTierHiCacheStorage(storage_config({}, mla=True, tp_rank=1, tp_size=2), {}, engine=_sharing(eng_mla))
    r.register_mem_pool_host(m1)
    assert r.batch_exists(keys) == 1


def _sharing(eng: CacheEngine) -> CacheEngine:
    """A second engine over the same tiers (another rank of one process sharing a CPU tier)."""
    return CacheEngine(eng.config, tiers=list(eng.storage.tiers))


def test_failure_injector_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's own injector, switched on by its test env vars, fails every call: no exception."""
    monkeypatch.setenv("SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE", "1.0")
    monkeypatch.setenv("KVTIER_CPU__PIN_MEMORY", "no")
    p = pool("mha", "page_first")
    b = StorageBackendFactory.create_backend("dynamic", storage_config({}), p)
    assert isinstance(b, HiCacheStorageFailureInjector)
    b.register_mem_pool_host(p)
    idx = fill_random(p, 2, seed=8)
    keys = page_keys(2)
    assert b.batch_set_v1(keys, idx) == [False, False]
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, idx) == [False, False]
    assert b.get_stats() is not None  # passes through to kvtier's StorageMetrics


def test_unregistered_backend_misses() -> None:
    b = KVTierHiCacheStorage(storage_config({}), {}, engine=engine())
    keys = page_keys(2)
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, torch.arange(2 * PAGE)) == [False, False]


def test_refuses_unsupported_pools() -> None:
    with pytest.raises(SGLangLayoutError, match="hicache-mem-layout"):
        backend(pools.mha_pool("page_unified"))
    with pytest.raises(SGLangLayoutError, match="head dims"):
        backend(pools.mha_pool("page_first", v_head_dim=pools.HEAD_DIM * 2))


def test_v2_kv_pool_and_extra_pools() -> None:
    p = pool("mha", "page_first")
    b = backend(p)
    idx = fill_random(p, 2, seed=9)
    keys = page_keys(2)
    res = b.batch_set_v2([PoolTransfer(name=PoolName.KV, host_indices=idx, keys=keys)])
    assert res == {PoolName.KV: [True, True]}
    assert b.batch_exists_v2(keys).kv_hit_pages == 2
    # A Mamba pool kvtier does not store: no usable hit (a KV prefix alone cannot be restored).
    mamba = PoolTransfer(name=PoolName.MAMBA, keys=keys[-1:])
    assert b.batch_exists_v2(keys, [mamba]).kv_hit_pages == 0
    assert b.batch_get_v2([mamba]) == {PoolName.MAMBA: [False]}


def test_get_stats_reports_pages() -> None:
    p = pool("mha", "page_first")
    b = backend(p)
    idx = fill_random(p, 3, seed=10)
    keys = page_keys(3)
    b.batch_set_v1(keys, idx)
    b.batch_get_v1(keys, idx)
    m = b.get_stats()
    assert m.backup_pgs == [3] and m.prefetch_pgs == [3]
    assert all(bw > 0 for bw in m.backup_bandwidth + m.prefetch_bandwidth)
    assert b.get_stats().backup_pgs == []  # since the last call
    s = b.engine.stats()
    assert s.stored_chunks == 3 and s.hit_tokens == 0 and s.retrieved_tokens == 3 * PAGE
    assert backend(pool("mha", "page_first"), metrics=False).get_stats() is None


def test_two_processes_share_pages_through_disk(tmp_path: Path) -> None:
    """Writer and reader are separate processes with different PYTHONHASHSEED and pool layouts:
    the keys from SGLang's page hashes are stable and the pages come back bit-exact."""
    import os
    import subprocess

    script = str(Path(__file__).parent / "other_process.py")
    for role, seed, layout in (("write", "1", "page_first"), ("read", "2", "layer_first")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run(
            [sys.executable, script, role, str(tmp_path), layout],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-2:] == ["ok", "4"], r.stdout + r.stderr[-2000:]


def test_misfiled_page_is_a_miss() -> None:
    """A value stored under another page's key (a collision, a corrupt remote) is never loaded."""
    p = pool("mha", "page_first")
    eng = engine()
    b = backend(p, eng)
    idx = fill_random(p, 2, seed=12)
    a, other = page_keys(2)
    assert b.batch_set_v1([a], idx[:PAGE]) == [True]
    da, do = eng.page_digests([a, other])
    with eng.retrieve_pages([da], PAGE) as views:
        chunk = views.chunks[0][1]
        assert eng.storage.put(do, type(chunk)(chunk.kv.clone(), chunk.fingerprint, PAGE))
    before = p.get_data_page(int(idx[PAGE]), flat=True).clone()
    assert b.batch_get_v1([other], idx[PAGE:]) == [False]
    assert torch.equal(before, p.get_data_page(int(idx[PAGE]), flat=True))
    assert eng.stats().fingerprint_mismatches == 1


def test_unreachable_remote_tier_is_a_miss() -> None:
    """kvtier's failure rule through SGLang's calls: a remote tier that refuses every connection
    (nothing listens on port 1) gives misses and failed sets, never an exception."""
    eng = CacheEngine(
        Config.from_dict(
            {"cpu": {"enabled": False}, "remote": {"url": "redis://127.0.0.1:1", "timeout_s": 0.5}}
        )
    )
    p = pool("mha", "page_first")
    b = backend(p, eng)
    idx = fill_random(p, 2, seed=13)
    keys = page_keys(2)
    assert b.batch_set_v1(keys, idx) == [False, False]
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, idx) == [False, False]
    assert not b.batch_set(keys, pages(p, idx))
