"""Issue 22.5: ``lookup`` must never promise a chunk ``retrieve`` cannot return, even when Redis
(``allkeys-lru``, as the README recommends) evicts a chunk's payload part and keeps its header."""

from __future__ import annotations

import uuid

import redis
import torch
from tests.conftest import make_kv, make_tokens
from tests.remote import servers

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.tiers.redis import RedisTier


def chunk(seed: int, tokens: int = 64) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    return Chunk(torch.randn(4, 2, tokens, 2, 16, generator=g), seed.to_bytes(8, "little"), tokens)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_lost_payload_part_is_not_present(redis_server: servers.RedisServer) -> None:
    p = f"t{uuid.uuid4().hex[:10]}"
    one = RedisTier(redis_server.url, key_prefix=p)  # one part per chunk
    split = RedisTier(redis_server.url, key_prefix=p + "s", max_value_bytes=4096)  # 16 parts
    r = redis.Redis(host="127.0.0.1", port=redis_server.port)
    for t, pre, lost in ((one, p, 0), (split, p + "s", 9)):
        keys = [key(i) for i in range(4)]
        assert all(t.batched_put([(k, chunk(i)) for i, k in enumerate(keys)]))
        assert t.prefix_contains(keys) == 4
        r.delete(f"{pre}:{{{keys[2].hex()}}}:{lost}")  # what allkeys-lru does to one part
        assert t.prefix_contains(keys) == 2  # the hole ends the prefix: 2, not 4
        assert not t.contains(keys[2]) and t.contains(keys[3])
        assert [c is not None for c in t.batched_get(keys)] == [True, True, False, True]
        t.close()


def test_lookup_matches_retrieve_under_allkeys_lru(own_redis: servers.RedisServer) -> None:
    r = redis.Redis(host="127.0.0.1", port=own_redis.port)
    r.config_set("maxmemory-policy", "allkeys-lru")
    r.config_set("maxmemory", 8 * 1024**2)
    cfg = Config.load(
        env={},
        chunk_tokens=16,
        cpu__enabled=False,
        model__model_id="lru-test",
        remote__url=own_redis.url,
        # generous: a call slower than half the timeout opens the breaker (a miss by design), which
        # on a loaded machine would make lookup and retrieve disagree for reasons of load, not eviction
        remote__timeout_s=60.0,
    )
    eng = CacheEngine(cfg)
    prompts = [(make_tokens(128, seed=i), make_kv(128, seed=i)) for i in range(60)]
    for t, kv in prompts:  # ~30 MiB into 8 MiB: Redis evicts keys, headers and parts alike
        eng.store(t, kv)
    assert int(r.info("stats")["evicted_keys"]) > 0
    # What eviction left (some chunks' parts gone, others whole) is what lookup must see. Stop
    # evicting before reading: a read's own reply buffer counts toward maxmemory, so at the limit
    # a retrieve could evict a chunk its lookup just saw (a race, a miss by design, not a broken
    # promise; it failed ~1 run in 7 on a 2-core box).
    r.config_set("maxmemory", 0)
    broken = 0
    hits = 0
    for t, kv in prompts:
        n = eng.lookup(t)
        got = eng.retrieve(t)
        broken += got.num_tokens != n
        hits += n
        if got.num_tokens:
            assert torch.equal(got.kv, kv[:, :, : got.num_tokens])
    print(f"\nallkeys-lru: {hits} tokens promised over {len(prompts)} prompts, {broken} broken promises")
    assert broken == 0
    eng.close()
