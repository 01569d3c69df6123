"""The router's Prometheus series, in its own registry (one router per process in practice; tests
build several). ``kvtier_router_predicted_hit_tokens_total / kvtier_router_prompt_tokens_total``
is the prefix share the chosen instances' daemons said they held: the router's view of its
hit rate (the engine's own count is its ``prompt_tokens_details.cached_tokens``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvtier_router_requests",
            "client requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.backend_requests = Counter(
            "kvtier_router_backend_requests",
            "requests forwarded to each instance, by outcome",
            ["backend", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "kvtier_router_decisions",
            "routing choices by policy and reason",
            ["policy", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "kvtier_router_retries", "requests re-sent to another instance", ["reason"], registry=r
        )
        self.lookup_seconds = Histogram(
            "kvtier_router_lookup_seconds",
            "the /lookup fan-out per request",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.lookup_failures = Counter(
            "kvtier_router_lookup_failures", "daemon /lookup calls that failed", ["backend"], registry=r
        )
        self.prompt_tokens = Counter(
            "kvtier_router_prompt_tokens", "prompt tokens routed (tokenized)", registry=r
        )
        self.predicted_hit_tokens = Counter(
            "kvtier_router_predicted_hit_tokens",
            "prompt tokens the chosen instance's daemon held",
            registry=r,
        )
        self.first_byte_seconds = Histogram(
            "kvtier_router_first_byte_seconds",
            "request received to the first byte from an engine",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.inflight = Gauge(
            "kvtier_router_inflight", "requests in flight per instance", ["backend"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
