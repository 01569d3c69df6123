"""The daemon's Prometheus series: only ones that are true of the daemon.

The daemon is not a ``CacheEngine``: it sees chunk keys, not tokens, and never runs
``CacheEngine.store``/``retrieve``/``lookup``. So the engine's series (``kvtier_hit_tokens_total``,
``kvtier_hit_rate``, the engine latency histograms) are not exported here — they would read 0
forever while the daemon serves hits (issue 22, 10). What is exported:

* ``kvtier_server_<counter>_total`` / gauges: ``ServerCounters`` and the payload budget, the
  same numbers as ``/stats``' ``server`` section;
* ``kvtier_tier_<field>{tier=...}``: the daemon's tiers, the same numbers as ``/stats``'
  ``tier:<name>`` sections (the engine's own per-tier families, from the same ``TierStats``);
* ``kvtier_server_request_seconds{op=...}``: time to handle each request, by message type;
  its ``_count`` over all ops equals ``kvtier_server_requests_total``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.observability import LATENCY_BUCKETS_S, CacheStats, Metrics

if TYPE_CHECKING:
    from kvtier.server.service import CacheService

GAUGES = ("active_sessions",)
TIER_PREFIX = "kvtier_tier_"


class _ServerCollector(Collector):
    def __init__(self, service: CacheService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        for name, value in vars(self.service.counters).items():
            if name in GAUGES:
                yield GaugeMetricFamily(f"kvtier_server_{name}", f"daemon {name}", value=value)
            else:
                yield CounterMetricFamily(f"kvtier_server_{name}", f"daemon {name}", value=value)
        b = self.service.budget
        if b is not None:
            yield GaugeMetricFamily("kvtier_server_inflight_bytes", "socket payload bytes held", value=b.used)
            yield CounterMetricFamily(
                "kvtier_server_inflight_waits", "frames that waited for the budget", value=b.waits
            )


class _TierCollector(Collector):
    """The engine's per-tier families (one definition of them) over the daemon's tiers."""

    def __init__(self, service: CacheService) -> None:
        self._engine_face = Metrics(lambda: CacheStats(tiers=service.manager.stats()))

    def collect(self) -> Iterator[Any]:
        for fam in self._engine_face.registry.collect():
            if fam.name.startswith(TIER_PREFIX):
                yield fam


class DaemonMetrics:
    """The registry behind the daemon's ``/metrics``."""

    def __init__(self, service: CacheService) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServerCollector(service))
        self.registry.register(_TierCollector(service))
        ProcessCollector(registry=self.registry)  # process_*: the daemon's RSS, CPU, open fds
        self.request_seconds = Histogram(
            "kvtier_server_request_seconds",
            "time to handle one request",
            ["op"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
