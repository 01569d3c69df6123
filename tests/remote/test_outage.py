"""A stalled store (SIGSTOP: it accepts connections and never answers) costs a request at most ONE
``timeout_s`` in total, ~0 once the breaker is open, and the cache is back within the documented
bound (``retry_backoff_max_s × 1.1 + timeout_s``) after SIGCONT. Real redis-server, real daemon."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from tests.conftest import make_kv, make_tokens
from tests.remote import servers

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess
from kvtier.tiers.breaker import BreakerState

TIMEOUT_S = 0.5
BACKOFF_MAX_S = 1.0
SLACK_S = 0.35  # scheduling on a loaded 2-core box; far below a second timeout


def engine_on(url: str, *, cpu: bool) -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk_tokens=16,
        cpu__enabled=cpu,
        cpu__max_bytes="64MiB",
        model__model_id="outage-test",
        remote__url=url,
        remote__timeout_s=TIMEOUT_S,
        remote__retry_backoff_s=0.2,
        remote__retry_backoff_max_s=BACKOFF_MAX_S,
    )
    return CacheEngine(cfg)


def request(eng: CacheEngine, seed: int) -> float:
    """One engine request as a serving engine makes it (lookup, retrieve, store a cold prompt);
    returns the seconds spent waiting for the cache. It must never raise."""
    tokens, kv = make_tokens(64, seed=seed), make_kv(64, seed=seed)
    t0 = time.monotonic()
    n = eng.lookup(tokens)
    got = eng.retrieve(tokens)
    assert got.num_tokens == n or got.num_tokens == 0
    eng.store(tokens, kv)
    return time.monotonic() - t0


def outage(eng: CacheEngine, pause: Callable[[], None], resume: Callable[[], None]) -> None:
    tokens, kv = make_tokens(64, seed=1), make_kv(64, seed=1)
    assert eng.store(tokens, kv) == 64 and eng.lookup(tokens) == 64
    tier = eng.storage.tiers[-1]
    breaker = tier.breaker  # type: ignore[attr-defined]
    pause()
    try:
        waits = [request(eng, 100 + i) for i in range(12)]
        assert breaker.state is not BreakerState.CLOSED
        assert waits[0] <= TIMEOUT_S + SLACK_S, waits  # the first request: one timeout, not three
        assert sum(waits) <= TIMEOUT_S + SLACK_S + 0.5, waits  # the outage cost ONE timeout in all
        assert max(waits[1:]) < 0.05 + SLACK_S / 4, waits  # breaker open: ~0 per request
        print(
            f"\noutage {tier.name}: first request {waits[0] * 1000:.0f} ms, later max "
            f"{max(waits[1:]) * 1000:.1f} ms, total {sum(waits) * 1000:.0f} ms"
        )
    finally:
        resume()
    t0 = time.monotonic()
    bound = BACKOFF_MAX_S * 1.1 + TIMEOUT_S + 2.0  # documented bound + slack for a loaded box
    while eng.lookup(tokens) != 64 and time.monotonic() - t0 < bound + 5:
        time.sleep(0.05)
    took = time.monotonic() - t0
    assert eng.lookup(tokens) == 64 and took <= bound, took
    got = eng.retrieve(tokens)
    assert torch.equal(got.kv, kv)
    print(f"outage {tier.name}: back {took:.2f} s after SIGCONT (bound {bound:.1f} s)")


@pytest.mark.parametrize("cpu", [False, True], ids=["remote-only", "cpu+remote"])
def test_stalled_redis_costs_one_timeout(own_redis: servers.RedisServer, cpu: bool) -> None:
    eng = engine_on(own_redis.url, cpu=cpu)
    assert own_redis.proc is not None
    pid = own_redis.proc.pid
    try:
        outage(eng, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT))
    finally:
        os.kill(pid, signal.SIGCONT)
        eng.close()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess("--cpu-size", "64MiB").start()
    yield d
    os.kill(d.pid, signal.SIGCONT)
    d.kill()
    d.cleanup()


def test_stalled_daemon_costs_one_timeout(daemon: DaemonProcess) -> None:
    eng = engine_on(daemon.url, cpu=False)
    try:
        pid = daemon.pid
        outage(eng, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT))
    finally:
        eng.close()
