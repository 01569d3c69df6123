"""Faults with a real redis-server: killed and restarted mid-run, and a server that stalls."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
import torch
from tests.conftest import make_kv, make_tokens
from tests.remote import servers

from kvtier import CacheEngine, Config
from kvtier.tiers.breaker import BreakerState
from kvtier.tiers.redis import RedisTier


def engine_on(url: str, **kw: object) -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk_tokens=16,
        cpu__enabled=False,
        model__model_id="fault-test",
        remote__url=url,
        remote__timeout_s=0.5,
        remote__retry_backoff_s=0.2,
        **kw,
    )
    return CacheEngine(cfg)


def test_killed_then_restarted_requests_are_misses_then_hits_resume(
    own_redis: servers.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    eng = engine_on(own_redis.url)
    (tier,) = eng.storage.tiers
    assert isinstance(tier, RedisTier)
    tokens, kv = make_tokens(64, seed=1), make_kv(64, seed=1)
    assert eng.store(tokens, kv) == 64 and eng.lookup(tokens) == 64

    caplog.set_level(logging.INFO, logger="kvtier")
    own_redis.kill()
    t0 = time.monotonic()
    for i in range(20):  # every call returns (a miss / a skipped write), none raises
        assert eng.lookup(tokens) == 0
        assert eng.retrieve(tokens).num_tokens == 0
        assert eng.store(make_tokens(32, seed=100 + i), make_kv(32, seed=100 + i)) == 0
    assert time.monotonic() - t0 < 5.0  # the open breaker answers at once, not once per timeout
    assert tier.breaker.state is not BreakerState.CLOSED
    s = eng.stats().tiers["redis"]
    assert s.errors >= 3 and s.put_failures >= 1
    opened = [r for r in caplog.records if "circuit closed -> open" in r.getMessage()]
    assert len(opened) == 1 and opened[0].levelno == logging.WARNING  # logged once, not per request

    own_redis.start()  # same port, empty (no persistence)
    deadline = time.monotonic() + 10
    while eng.store(tokens, kv) == 0 and time.monotonic() < deadline:  # the probe reconnects
        time.sleep(0.05)
    assert tier.breaker.state is BreakerState.CLOSED
    assert eng.lookup(tokens) == 64
    got = eng.retrieve(tokens)
    assert got.num_tokens == 64 and torch.equal(got.kv, kv)
    assert "circuit half_open -> closed" in caplog.text
    eng.close()


def test_slow_server_stays_within_the_timeout(own_redis: servers.RedisServer) -> None:
    tier = RedisTier(own_redis.url, timeout_s=0.3, retry_backoff_s=0.1, failure_threshold=2)
    c = make_kv(16, seed=3)
    from kvtier.tiers.base import Chunk

    assert tier.put(b"k" * 16, Chunk(c, b"fp", 16))
    blocker = redis.Redis(host="127.0.0.1", port=own_redis.port)
    th = threading.Thread(target=lambda: blocker.execute_command("DEBUG", "SLEEP", "1.5"))
    th.start()
    time.sleep(0.1)  # the server is now stalled for ~1.4 s
    took = []
    for _ in range(4):
        t0 = time.monotonic()
        assert tier.get(b"k" * 16) is None
        took.append(time.monotonic() - t0)
    assert max(took) < 0.3 + 0.25, took  # each call bounded by the timeout (+ scheduling slack)
    # one stalled call opens the breaker (not failure_threshold of them): 4 calls cost ONE timeout
    assert sum(took) < 0.3 + 0.4, took
    assert tier.breaker.state is BreakerState.OPEN and tier.stats().errors == 1
    th.join()
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        got = tier.get(b"k" * 16)
        time.sleep(0.05)
    assert got is not None and torch.equal(got.kv, c)  # recovered after the stall
    tier.close()
    blocker.close()


def test_full_store_refuses_writes_without_opening_the_breaker(
    own_redis: servers.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from kvtier.tiers.base import Chunk

    tier = RedisTier(own_redis.url, failure_threshold=1)
    small = Chunk(make_kv(4, seed=1), b"fp", 4)
    assert tier.put(b"s" * 16, small)
    r = redis.Redis(host="127.0.0.1", port=own_redis.port)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 64 * 1024)
    big = Chunk(make_kv(4096, seed=2), b"fp", 4096)  # 2 MiB: over the limit
    with caplog.at_level(logging.DEBUG, logger="kvtier"):
        for _ in range(3):
            assert not tier.put(b"b" * 16, big)  # refused (OOM), a soft failure
    assert tier.breaker.state is BreakerState.CLOSED  # the store is up: reads go on
    got = tier.get(b"s" * 16)
    assert got is not None and torch.equal(got.kv, small.kv)
    assert tier.stats().errors == 3
    warned = [x for x in caplog.records if "refused" in x.getMessage() and x.levelno == logging.WARNING]
    assert len(warned) == 1 and "maxmemory" in warned[0].getMessage()
    tier.close()
    r.close()
