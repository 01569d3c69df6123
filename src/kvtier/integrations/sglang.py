"""kvtier as an SGLang HiCache storage backend (the L3 tier under SGLang's host pool).

SGLang loads it by name through its ``dynamic`` backend::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
    '{"backend_name": "kvtier", "module_path": "kvtier.integrations.sglang",
      "class_name": "KVTierHiCacheStorage", "interface_v1": 1}'

and every kvtier tier (CPU, disk, Redis/Valkey, S3, the daemon) serves SGLang's pages.

Mapping:
* A page key is SGLang's chained page hash (a hex string); ``CacheEngine.page_digests`` folds
  kvtier's namespace into it. The namespace comes from ``HiCacheStorageConfig`` and the pool:
  model name, KV dtype and shape, tp rank/size (MLA: one copy shared by all tp ranks, as
  SGLang's own backends do), pp and attention-cp rank in the salt, ``cache_salt`` from the
  extra config.
* A page is stored as one kvtier chunk ``[layers, planes, page_size, heads, head_dim]``
  (``sglang_pages``), read from the host pool in place and loaded with one copy into it.
* ``batch_exists`` is the leading run of held pages; ``batch_get_v1`` fills the leading run it
  can and reports ``False`` from the first miss on, which SGLang treats as the end of the hit.

Invariants:
* Calls only ``CacheEngine`` (never its storage or a tier).
* A failing tier is a miss (the engine's rule): exists/get answer fewer pages, set answers
  ``False``; no call raises because the cache did. Before ``register_mem_pool_host`` every
  lookup is a miss.
* A pool kvtier cannot store is refused at registration with a one-line reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

from kvtier.chunk import dtype_name
from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.sglang_pages import PageLayout, SGLangLayoutError, describe_pool
from kvtier.keys import Namespace

__all__ = ["KVTierHiCacheStorage", "SGLangLayoutError", "namespace_for"]

log = logging.getLogger(__name__)


def namespace_for(cfg: HiCacheStorageConfig, layout: PageLayout, cache_salt: str = "") -> Namespace:
    """The kvtier namespace of one SGLang rank's pages. MLA KV is the same on every tp rank, so
    it is keyed without the tp rank (one stored copy, any rank reads it); pp and attention-cp
    ranks hold different layers / slices and are always in the key."""
    mla = cfg.is_mla_model or layout.kind == "mla"
    salt = f"sglang|pp{cfg.pp_rank}/{cfg.pp_size}|cp{cfg.attn_cp_rank}/{cfg.attn_cp_size}|{cache_salt}"
    return Namespace(
        model_id=cfg.model_name or "unnamed-model",
        kv_dtype=dtype_name(layout.dtype),
        kv_shape=(layout.layers, layout.heads, layout.head_dim),
        tp_rank=0 if mla else cfg.tp_rank,
        tp_size=1 if mla else cfg.tp_size,
        cache_salt=salt,
        kv_planes=layout.planes,
    )


class KVTierHiCacheStorage(HiCacheStorage):
    """SGLang ``HiCacheStorage`` over a kvtier ``CacheEngine``.

    Extra config keys (``--hicache-storage-backend-extra-config``): ``kvtier_config`` (path to a
    kvtier YAML file; default ``KVTIER_CONFIG`` / kvtier's defaults), ``cache_salt``.
    ``engine=`` lets a test or an embedding program pass its own engine.
    """

    def __init__(
        self,
        storage_config: HiCacheStorageConfig,
        kwargs: dict[str, Any] | None = None,
        *,
        engine: CacheEngine | None = None,
    ) -> None:
        extra = storage_config.extra_config or {}
        self.storage_config = storage_config
        self.cache_salt = str(extra.get("cache_salt", ""))
        self.engine = engine if engine is not None else CacheEngine(Config.load(extra.get("kvtier_config")))
        self.layout: PageLayout | None = None
        self._lock = threading.Lock()
        self._prefetch_pgs: list[int] = []
        self._backup_pgs: list[int] = []
        self._prefetch_bw: list[float] = []
        self._backup_bw: list[float] = []

    # -- registration -------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Learn the pool's layout and bind the engine's namespace to it (refuses what it can't store)."""
        layout = describe_pool(mem_pool_host)
        ns = namespace_for(self.storage_config, layout, self.cache_salt)
        self.engine.bind(ns)
        super().register_mem_pool_host(mem_pool_host)
        self.layout = layout
        log.info(
            "kvtier HiCache backend: %s %s pages of %d tokens, namespace %s",
            layout.kind,
            layout.layout,
            layout.page_tokens,
            ns,
        )

    def _digests(self, keys: Sequence[str]) -> list[bytes]:
        return self.engine.page_digests(keys)

    def _host_page(self, index: int) -> torch.Tensor:
        """The pool's page starting at slot ``index``, in the pool's shape (a view, no copy)."""
        return self.mem_pool_host.get_data_page(index, flat=False)

    # -- existence ----------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        if self.layout is None or not keys:
            return 0
        return self.engine.lookup_pages(self._digests(keys), self.layout.page_tokens)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists_v2(
        self,
        keys: list[str],
        pool_transfers: list[PoolTransfer] | None = None,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> PoolTransferResult:
        """KV pages only: a model with extra pools (Mamba, SWA, DSA indexer) gets no hit, since
        kvtier does not store those pools and a KV prefix without them is not loadable."""
        if pool_transfers:
            return PoolTransferResult.empty()
        n = self.batch_exists(keys, extra_info)
        return PoolTransferResult(n, {PoolName.KV: n} if n else {}, list(range(1, n + 1)))

    # -- zero-copy v1 path (interface_v1): pages addressed by host-pool slot indices ----------
    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        if self.layout is None or not keys:
            return [False] * len(keys)
        ps = self.layout.page_tokens
        starts = host_indices[::ps].tolist()
        return self._load(keys, [self._host_page(int(s)) for s in starts[: len(keys)]])

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        if self.layout is None or not keys:
            return [False] * len(keys)
        ps = self.layout.page_tokens
        starts = host_indices[::ps].tolist()
        return self._save(keys, [self._host_page(int(s)) for s in starts[: len(keys)]])

    # -- generic path: flat page tensors SGLang copies out of / into the pool ----------------
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        out = self.batch_get([key], [target_location])
        return out[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        if self.layout is None or target_locations is None:
            return [None] * len(keys)
        ok = self._load(keys, list(target_locations))
        return [t if hit else None for t, hit in zip(target_locations, ok)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        if self.layout is None or values is None:
            return False
        return all(self._save(keys, list(values)))

    # -- v2 (pool transfers): the KV pool only ------------------------------------------------
    def batch_get_v2(
        self, transfers: list[PoolTransfer], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> dict[str, list[bool]]:
        return {t.name: self._v2(t, self.batch_get_v1, extra_info) for t in transfers}

    def batch_set_v2(
        self, transfers: list[PoolTransfer], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> dict[str, list[bool]]:
        return {t.name: self._v2(t, self.batch_set_v1, extra_info) for t in transfers}

    def _v2(self, t: PoolTransfer, op: Any, extra_info: HiCacheStorageExtraInfo | None) -> list[bool]:
        keys = t.keys or []
        if t.name != PoolName.KV or t.host_indices is None:
            return [False] * len(keys)
        return list(op(keys, t.host_indices, extra_info))

    # -- the two moves ------------------------------------------------------------------------
    def _load(self, keys: Sequence[str], dst: Sequence[torch.Tensor]) -> list[bool]:
        """Copy the leading run of held pages into ``dst`` (pool pages, pool-shaped or flat); True
        per page loaded."""
        assert self.layout is not None
        lay = self.layout
        t0 = time.perf_counter()
        n = 0
        with self.engine.retrieve_pages(self._digests(keys), self.layout.page_tokens) as views:
            for (_, chunk), out in zip(views.chunks, dst):
                lay.scatter(chunk.kv, out)
                n += 1
        self._record(self._prefetch_pgs, self._prefetch_bw, n, time.perf_counter() - t0)
        return [True] * n + [False] * (len(keys) - n)

    def _save(self, keys: Sequence[str], pages: Sequence[torch.Tensor]) -> list[bool]:
        assert self.layout is not None
        t0 = time.perf_counter()
        lay = self.layout
        ok = self.engine.store_pages(self._digests(keys), [lay.gather(p) for p in pages])
        self._record(self._backup_pgs, self._backup_bw, sum(ok), time.perf_counter() - t0)
        return ok

    def _record(self, pgs: list[int], bw: list[float], n: int, dt: float) -> None:
        if not n or not self.storage_config.enable_storage_metrics:
            return
        assert self.layout is not None
        lay = self.layout
        gb = (
            n
            * lay.layers
            * lay.planes
            * lay.page_tokens
            * lay.heads
            * lay.head_dim
            * lay.dtype.itemsize
            / 1e9
        )
        with self._lock:
            pgs.append(n)
            bw.append(gb / dt if dt > 0 else 0.0)

    # -- housekeeping -------------------------------------------------------------------------
    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call (pages and GB/s per batch); ``None``
        unless ``--enable-cache-report``/storage metrics are on. kvtier's own counters are in
        ``engine.stats()`` and its Prometheus metrics."""
        if not self.storage_config.enable_storage_metrics:
            return None
        from sglang.srt.observability.metrics_collector import StorageMetrics

        m = StorageMetrics()
        with self._lock:
            m.prefetch_pgs, self._prefetch_pgs = self._prefetch_pgs, []
            m.backup_pgs, self._backup_pgs = self._backup_pgs, []
            m.prefetch_bandwidth, self._prefetch_bw = self._prefetch_bw, []
            m.backup_bandwidth, self._backup_bw = self._backup_bw, []
        return m

    def clear(self) -> None:
        """SGLang's "clear storage" has no kvtier equivalent across shared tiers; it is a no-op
        (other processes may be reading the same pages)."""
        log.info("kvtier HiCache backend: clear() leaves shared kvtier tiers untouched")

    def close(self) -> None:
        self.engine.flush(timeout_s=10.0)
        self.engine.close()
