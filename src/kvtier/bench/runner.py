"""Run a workload against one or more drivers and collect per-variant results.

Several drivers (e.g. transformers without and with kvtier) run *interleaved*: request i goes
to every driver before request i+1. On a shared, noisy machine both variants then see the same
load over time, so their ratio is fair even when absolute times drift. Each driver keeps its
own state (its kvtier engine), so interleaving does not leak cache between variants.

With ``concurrency`` > 1 (one driver, typically HTTP) requests are sent from a thread pool in
order; a chat turn waits for the turn it extends (``Request.depends_on``), as a user would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvtier.bench.drivers import Driver, Result
from kvtier.bench.workloads import Request, Workload, WorkloadError

StatsFetch = Callable[[], dict[str, Any]]
Tick = Callable[[], None]


@dataclass
class VariantRun:
    """One driver's results on one workload. ``wall_s``: busy time (sequential) or elapsed (concurrent)."""

    name: str
    results: list[Result]
    wall_s: float
    cache: dict[str, Any] | None = None  # the engine's CacheStats, or the daemon's /stats delta
    extra: dict[str, Any] = field(default_factory=dict)


def run_interleaved(
    workload: Workload, drivers: list[Driver], *, tick: Tick | None = None
) -> list[VariantRun]:
    results: list[list[Result]] = [[] for _ in drivers]
    for req in workload.requests:
        for i, d in enumerate(drivers):
            results[i].append(d.run(req))
            if tick:
                tick()
    out = []
    for d, res in zip(drivers, results):
        busy = sum(r.latency_s for r in res if r.error is None)
        out.append(VariantRun(d.name, res, busy, d.cache_stats()))
    return out


def run_concurrent(
    workload: Workload, driver: Driver, concurrency: int, *, tick: Tick | None = None
) -> VariantRun:
    reqs = workload.requests
    futures: list[Future[Result]] = []

    def one(i: int, req: Request) -> Result:
        if req.depends_on is not None:
            futures[req.depends_on].result()  # submitted earlier, so already running or done
        r = driver.run(req)
        if tick:
            tick()
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for i, req in enumerate(reqs):
            futures.append(pool.submit(one, i, req))
        results = [f.result() for f in futures]
    return VariantRun(driver.name, results, time.perf_counter() - t0, driver.cache_stats())


def run_workload(
    workload: Workload,
    drivers: list[Driver],
    *,
    concurrency: int = 1,
    stats: StatsFetch | None = None,
    tick: Tick | None = None,
) -> list[VariantRun]:
    """All drivers on ``workload``; with ``stats`` (a daemon's /stats) the counters' delta is attached."""
    before = stats() if stats else None
    if concurrency > 1:
        if len(drivers) != 1:
            raise WorkloadError("concurrency > 1 runs one driver at a time")
        runs = [run_concurrent(workload, drivers[0], concurrency, tick=tick)]
    else:
        runs = run_interleaved(workload, drivers, tick=tick)
    if stats and before is not None:
        delta = stats_delta(before, stats())
        for r in runs:
            r.cache = delta
    return runs


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The daemon's counters over the run, with its chunk-level hit rate.

    The daemon counts chunk keys (``lookup_keys``, ``hit_keys``), so ``hit_rate`` here is a
    key (≈ token) hit rate; ``request_hit_rate`` is lookups with at least one hit over lookups
    (it may understate the per-request rate: an engine whose top tier is the daemon asks it
    once more after a partial hit, and that follow-up lookup counts as a miss).
    """
    b, a = before.get("server", {}), after.get("server", {})
    out: dict[str, Any] = {
        k: a[k] - b.get(k, 0) for k in a if isinstance(a[k], int | float) and k != "uptime_s"
    }
    keys = out.get("lookup_keys", 0)
    out["hit_rate"] = out.get("hit_keys", 0) / keys if keys else 0.0
    lookups = out.get("lookups", 0)
    if "hit_lookups" in out:
        out["request_hit_rate"] = out["hit_lookups"] / lookups if lookups else 0.0
    out["source"] = "daemon /stats"
    out["tiers"] = {k.removeprefix("tier:"): v for k, v in after.items() if k.startswith("tier:")}
    return out
