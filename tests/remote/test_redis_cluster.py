"""A real 3-node Redis cluster: chunks spread over the nodes by slot, values split within a slot."""

from __future__ import annotations

import redis
import torch
from tests.remote import servers

from kvtier.chunk import Chunk
from kvtier.tiers.redis import RedisTier


def test_cluster_round_trip_spreads_keys(redis_cluster: servers.RedisCluster) -> None:
    tier = RedisTier(redis_cluster.url, key_prefix="cl", max_value_bytes=8192)
    g = torch.Generator().manual_seed(0)
    chunks = [
        (
            i.to_bytes(16, "big"),
            Chunk(torch.randn(2, 2, 16 + 64 * (i % 2), 2, 8, generator=g), b"fp%d" % i, 16 + 64 * (i % 2)),
        )
        for i in range(24)
    ]
    assert tier.batched_put(chunks) == [True] * 24
    assert tier.prefix_contains([k for k, _ in chunks]) == 24
    got = tier.batched_get([k for k, _ in chunks])
    assert all(g is not None and torch.equal(g.kv, c.kv) for g, (_, c) in zip(got, chunks))
    per_node = []
    for n in redis_cluster.nodes:
        r = redis.Redis(host="127.0.0.1", port=n.port)
        names = [k.decode() for k in r.keys("cl:*")]
        per_node.append(len([k for k in names if k.count(":") == 1]))  # whole values + manifests
        for k in names:  # every part sits on the node of its manifest (same hash tag)
            assert r.exists(k.split("}")[0] + "}")
        r.close()
    assert sum(per_node) == 24 and sum(1 for n in per_node if n) >= 2, per_node
    assert tier.remove(chunks[1][0]) and tier.get(chunks[1][0]) is None
    assert tier.stats().errors == 0
    tier.close()


def test_unreachable_cluster_is_misses_not_errors() -> None:
    port = servers.free_port()  # no cluster listens: the client cannot even learn the topology
    tier = RedisTier(
        f"redis+cluster://127.0.0.1:{port},127.0.0.1:{port + 1}", timeout_s=0.3, failure_threshold=2
    )
    c = Chunk(torch.zeros(1, 2, 1, 1, 1), b"", 1)
    for _ in range(3):
        assert (
            tier.get(b"x" * 16) is None
            and not tier.put(b"x" * 16, c)
            and tier.prefix_contains([b"x" * 16]) == 0
        )
    s = tier.stats()
    assert s.errors == 2 and s.misses == 3 and s.put_failures == 3
    tier.close()
