"""CacheStats (a plain snapshot) and Prometheus metrics for one CacheEngine.

Each engine owns its own ``CollectorRegistry`` so several engines in one process (tests,
a daemon serving namespaces) never collide on metric names; ``render()`` gives the text
exposition format for an HTTP ``/metrics`` endpoint.

Counters live in ``CacheStats`` (the source of truth, cheap to snapshot); the Prometheus side
reads them at scrape time through a custom collector, and only latency histograms are
observed as events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.tiers.base import TierStats

LATENCY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass
class CacheStats:
    """Engine-level counters; ``hit_rate`` = hit tokens / requested tokens over all lookups."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    hit_requests: int = 0
    stores: int = 0
    stored_tokens: int = 0
    stored_chunks: int = 0
    store_failures: int = 0
    retrieves: int = 0
    retrieved_tokens: int = 0
    fingerprint_mismatches: int = 0
    nonfinite_chunks: int = 0  # chunks not stored because their KV held NaN/Inf (engine.py)
    uncacheable_requests: int = 0
    """Requests an integration could not key (an input kvtier does not hash): never cached."""
    cost_declined_tokens: int = 0
    """Cached tokens ``lookup_by_cost`` chose to recompute: loading them was measured slower."""
    cost_skipped_tiers: int = 0
    """Tier lookups ``lookup_by_cost`` left out: the tier reads slower than the model prefills."""
    tiers: dict[str, TierStats] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    @property
    def request_hit_rate(self) -> float:
        return self.hit_requests / self.lookups if self.lookups else 0.0

    @property
    def evictions(self) -> int:
        return sum(t.evictions for t in self.tiers.values())

    def bytes_per_tier(self) -> dict[str, int]:
        return {name: t.bytes_used for name, t in self.tiers.items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hit_rate"] = self.hit_rate
        d["request_hit_rate"] = self.request_hit_rate
        d["evictions"] = self.evictions
        return d


METRIC_NAMES = {"bytes_used": "used_bytes"}
"""TierStats field -> metric name where they differ (Prometheus puts the unit last)."""


class _StatsCollector(Collector):
    def __init__(self, snapshot: Callable[[], CacheStats]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        s = self._snapshot()
        for name, doc in (
            ("lookups", "Lookup requests"),
            ("lookup_tokens", "Tokens asked for in lookups"),
            ("hit_tokens", "Tokens found cached (leading prefix)"),
            ("hit_requests", "Lookups with at least one cached chunk"),
            ("stored_tokens", "Tokens newly stored"),
            ("store_failures", "Chunks no tier could store"),
            ("retrieved_tokens", "Tokens returned by retrieve"),
            ("fingerprint_mismatches", "Chunks rejected on read (fingerprint/shape mismatch)"),
            ("nonfinite_chunks", "Chunks not stored: their KV held NaN/Inf (the engine computed garbage)"),
            ("uncacheable_requests", "Requests with an input kvtier cannot key: never cached"),
            ("cost_declined_tokens", "Cached tokens recomputed because loading them was measured slower"),
            ("cost_skipped_tiers", "Tier lookups left out: the tier reads slower than the model prefills"),
        ):
            yield CounterMetricFamily(f"kvtier_{name}", doc, value=getattr(s, name))
        yield GaugeMetricFamily(
            "kvtier_hit_rate",
            "Lifetime hit tokens / requested tokens (for a window: "
            "rate(kvtier_hit_tokens_total) / rate(kvtier_lookup_tokens_total))",
            value=s.hit_rate,
        )
        yield GaugeMetricFamily(
            "kvtier_request_hit_rate",
            "Lifetime share of lookups with at least one hit",
            value=s.request_hit_rate,
        )
        per_tier = (
            ("bytes_used", GaugeMetricFamily, "Bytes held"),
            ("chunks", GaugeMetricFamily, "Chunks held"),
            ("capacity_bytes", GaugeMetricFamily, "Capacity in bytes"),
            ("hits", CounterMetricFamily, "Chunk hits"),
            ("misses", CounterMetricFamily, "Chunk misses"),
            ("puts", CounterMetricFamily, "Chunks stored"),
            ("put_failures", CounterMetricFamily, "Chunk stores that failed softly"),
            ("evictions", CounterMetricFamily, "Chunks evicted"),
            ("evicted_bytes", CounterMetricFamily, "Bytes evicted"),
            ("errors", CounterMetricFamily, "Run-time errors (degraded to misses)"),
            ("read_bytes", CounterMetricFamily, "Bytes read from the tier"),
            ("written_bytes", CounterMetricFamily, "Bytes written to the tier"),
            ("get_seconds", CounterMetricFamily, "Seconds spent in reads (divide by hits + misses)"),
            ("put_seconds", CounterMetricFamily, "Seconds spent in writes"),
            ("queue_depth", GaugeMetricFamily, "Asynchronous writes waiting for the tier"),
            ("queue_drops", CounterMetricFamily, "Asynchronous writes dropped on a full queue"),
            ("promotions", CounterMetricFamily, "Hits copied up to the top tier"),
        )
        for attr, fam_cls, doc in per_tier:
            fam = fam_cls(f"kvtier_tier_{METRIC_NAMES.get(attr, attr)}", doc, labels=["tier"])
            for tname, t in s.tiers.items():
                fam.add_metric([tname], getattr(t, attr))
            yield fam


class Metrics:
    """The Prometheus face of one engine."""

    def __init__(self, snapshot: Callable[[], CacheStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_StatsCollector(snapshot))
        ProcessCollector(registry=self.registry)  # process_* (CPU, RSS, fds): what a dashboard shows beside
        self.store_latency = Histogram(
            "kvtier_store_seconds",
            "CacheEngine.store latency",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.retrieve_latency = Histogram(
            "kvtier_retrieve_seconds",
            "CacheEngine.retrieve latency",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.lookup_latency = Histogram(
            "kvtier_lookup_seconds",
            "CacheEngine.lookup latency",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
