"""The Redis tier against a real redis-server: layout, split values, NX, TTL, corruption, auth."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
import redis
import torch
from tests.remote import servers

from kvtier import Config
from kvtier.chunk import Chunk
from kvtier.tiers.base import TierError
from kvtier.tiers.factory import build_tiers
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis_client import parse_redis_url


def chunk(seed: int, tokens: int = 64, dtype: torch.dtype = torch.bfloat16) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    return Chunk(torch.randn(4, 2, tokens, 2, 16, generator=g).to(dtype), seed.to_bytes(8, "little"), tokens)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def raw(server: servers.RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=server.password)


def test_parse_urls() -> None:
    assert parse_redis_url("redis://h:1/0").url == "redis://h:1/0"
    assert parse_redis_url("valkey://h:1").url == "redis://h:1"
    t = parse_redis_url("valkeys://u:p@h:1")
    assert t.url == "rediss://u:p@h:1" and t.ssl and not t.cluster
    c = parse_redis_url("redis+cluster://me:s3cret@a:7000,b:7001,[::1]:7002")
    assert (
        c.nodes == (("a", 7000), ("b", 7001), ("::1", 7002)) and c.username == "me" and c.password == "s3cret"
    )
    assert parse_redis_url("redis://a:1,b:2").cluster  # a node list is a cluster
    assert parse_redis_url("unix:///tmp/r.sock?db=1").url == "unix:///tmp/r.sock?db=1"
    for bad in ("memcached://h:1", "h:1", "redis+cluster://a:1,b"):
        with pytest.raises(TierError):
            parse_redis_url(bad)
    with pytest.raises(TierError) as e:
        parse_redis_url("redis+cluster://u:hunter2@a:1,b")
    assert "hunter2" not in str(e.value)


def test_split_value_layout_and_remove(redis_server: servers.RedisServer) -> None:
    p = prefix()
    t = RedisTier(redis_server.url, key_prefix=p, max_value_bytes=4096)
    c = chunk(1)  # 4*2*64*2*16*2 = 32 KiB -> 8 parts of 4 KiB
    assert t.put(key(1), c)
    r = raw(redis_server)
    names = sorted(n.decode() for n in r.keys(f"{p}:*"))
    main = f"{p}:{{{key(1).hex()}}}"
    assert names == sorted([main] + [f"{main}:{j}" for j in range(8)])
    assert r.get(main)[:4] == b"KVTC" and r.strlen(main) == 128  # the header alone
    assert all(r.strlen(f"{main}:{j}") == 4096 for j in range(8))
    got = t.get(key(1))
    assert got is not None and torch.equal(got.kv, c.kv) and got.fingerprint == c.fingerprint
    assert t.remove(key(1)) and r.keys(f"{p}:*") == []
    assert not t.remove(key(1))
    t.close()


def test_losing_writer_leaves_no_parts(redis_server: servers.RedisServer) -> None:
    p = prefix()
    a = RedisTier(redis_server.url, key_prefix=p, max_value_bytes=4096)
    b = RedisTier(redis_server.url, key_prefix=p, max_value_bytes=4096)
    barrier = threading.Barrier(2)
    results = []

    def put(t: RedisTier) -> None:
        barrier.wait()
        results.append(t.put(key(2), chunk(2)))

    ths = [threading.Thread(target=put, args=(t,)) for t in (a, b)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert results == [True, True]
    assert len(raw(redis_server).keys(f"{p}:*")) == 1 + 8  # one header, one set of parts
    assert a.stats().puts + b.stats().puts == 1
    a.close()
    b.close()


def test_reader_never_sees_a_half_written_value(redis_server: servers.RedisServer) -> None:
    p = prefix()
    w = RedisTier(redis_server.url, key_prefix=p, max_value_bytes=4096)
    rd = RedisTier(redis_server.url, key_prefix=p, max_value_bytes=4096)
    want = {i: chunk(100 + i) for i in range(20)}
    seen: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            for i, c in want.items():
                got = rd.get(key(i))
                if got is None:
                    continue
                seen.append("ok" if torch.equal(got.kv, c.kv) else "torn")

    th = threading.Thread(target=reader)
    th.start()
    for i, c in want.items():
        assert w.put(key(i), c)
    done.set()
    th.join()
    assert "torn" not in seen and rd.stats().errors == 0
    w.close()
    rd.close()


def test_batched_ops_and_prefix(redis_server: servers.RedisServer) -> None:
    t = RedisTier(redis_server.url, key_prefix=prefix(), max_value_bytes=16384)
    items = [(key(i), chunk(i, tokens=16 + 48 * (i % 2))) for i in range(6)]  # mixed whole / split values
    assert t.batched_put(items) == [True] * 6
    assert t.prefix_contains([key(0), key(1), key(2), key(9), key(3)]) == 3
    got = t.batched_get([key(i) for i in (5, 9, 0)])
    assert got[1] is None
    assert torch.equal(got[0].kv, items[5][1].kv) and torch.equal(got[2].kv, items[0][1].kv)
    s = t.stats()
    assert s.puts == 6 and s.hits == 2 and s.misses == 1 and s.chunks == 6 and s.errors == 0
    t.close()


def test_ttl_on_every_key(redis_server: servers.RedisServer) -> None:
    p = prefix()
    t = RedisTier(redis_server.url, key_prefix=p, ttl_s=30, max_value_bytes=4096)
    t.put(key(3), chunk(3))
    r = raw(redis_server)
    names = r.keys(f"{p}:*")
    assert len(names) == 9 and all(29_000 < r.pttl(n) <= 30_000 for n in names)
    t.close()


def test_stale_parts_of_an_evicted_chunk_do_not_block_a_rewrite(redis_server: servers.RedisServer) -> None:
    p = prefix()
    t = RedisTier(redis_server.url, key_prefix=p, max_value_bytes=4096)
    t.put(key(6), chunk(6))
    r = raw(redis_server)
    r.delete(f"{p}:{{{key(6).hex()}}}")  # as if maxmemory evicted the header key only
    assert t.get(key(6)) is None
    assert t.put(key(6), chunk(6)) and torch.equal(t.get(key(6)).kv, chunk(6).kv)
    r.delete(f"{p}:{{{key(6).hex()}}}:3")  # a part evicted: incomplete => a miss, cleaned up
    assert t.get(key(6)) is None and r.keys(f"{p}:*") == []
    t.close()


def test_corrupt_value_is_a_miss_and_deleted(
    redis_server: servers.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    p = prefix()
    t = RedisTier(redis_server.url, key_prefix=p)
    t.put(key(4), chunk(4))
    r = raw(redis_server)
    main = f"{p}:{{{key(4).hex()}}}"
    v = bytearray(r.get(main))
    v[-1] ^= 0xFF  # a flipped bit in the payload
    r.set(main, bytes(v))
    r.set(f"{p}:{{{key(5).hex()}}}", r.get(main))  # and a value filed under the wrong key
    with caplog.at_level(logging.WARNING):
        assert t.get(key(4)) is None and t.get(key(5)) is None
    assert "corrupt" in caplog.text
    assert not r.exists(main) and t.stats().errors == 2
    assert t.put(key(4), chunk(4)) and t.get(key(4)) is not None  # repaired by the next store
    t.close()


def test_auth_from_env_and_password_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    if servers.REDIS_SERVER is None:
        pytest.skip(servers.NO_REDIS_REASON)
    secret = "pw-" + uuid.uuid4().hex
    s = servers.RedisServer(password=secret).start()
    try:
        caplog.set_level(logging.DEBUG)
        env = {
            "KVTIER_REMOTE__URL": f"redis://127.0.0.1:{s.port}/0",
            "KVTIER_REMOTE__PASSWORD": secret,
            "KVTIER_REMOTE__RETRY_BACKOFF_S": "0.05",
        }
        cfg = Config.load(env=env, cpu__enabled=False)
        assert cfg.to_dict()["remote"]["password"] == "***" and secret not in repr(cfg)
        (t,) = build_tiers(cfg)
        assert isinstance(t, RedisTier) and t.put(key(1), chunk(1)) and t.get(key(1)) is not None
        # a wrong password, in the URL this time: misses, a logged outage, and no secret in any log line
        bad = RedisTier(f"redis://:{secret}x@127.0.0.1:{s.port}/0", failure_threshold=1)
        assert bad.get(key(1)) is None and not bad.put(key(2), chunk(2))
        assert bad.stats().errors == 1 and "circuit closed -> open" in caplog.text
        assert secret not in caplog.text and "***" in caplog.text
        t.close()
        bad.close()
    finally:
        s.cleanup()


def test_unix_socket_and_valkey_scheme() -> None:
    if servers.REDIS_SERVER is None:
        pytest.skip(servers.NO_REDIS_REASON)
    s = servers.RedisServer(extra=("--unixsocket", "kvtier.sock", "--unixsocketperm", "700")).start()
    try:
        for url in (f"unix://{s.dir}/kvtier.sock", f"valkey://127.0.0.1:{s.port}/0"):
            t = RedisTier(url, key_prefix=prefix())
            assert t.put(key(7), chunk(7)) and torch.equal(t.get(key(7)).kv, chunk(7).kv)
            t.close()
    finally:
        s.cleanup()
