"""``RedisTier.batched_get_into``: raw one-part values received straight into the caller's rows.

Against a real redis-server: the chunk returned *is* the destination (so the engine's copy into
its output does nothing), bit-exact; a payload corrupted in the store is a miss (counted, deleted),
never KV; values that cannot land in place (a codec, a split value, another shape) come back
decoded as ``batched_get`` does; and the engine's ``retrieve(out=)`` through a Redis-only stack
equals what was stored."""

from __future__ import annotations

import uuid

import pytest
import redis
import torch
from tests.remote import servers

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.keys import Namespace
from kvtier.tiers.redis import RedisTier


def _chunk(seed: int, tokens: int = 64) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    return Chunk(
        torch.randn(4, 2, tokens, 2, 16, generator=g).to(torch.bfloat16), seed.to_bytes(8, "little"), tokens
    )


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _rows(tokens: int, n: int) -> torch.Tensor:
    """An output like the engine's: ``[L, P, n * tokens, H, D]``, each chunk a strided view of it."""
    return torch.full((4, 2, n * tokens, 2, 16), 7.0, dtype=torch.bfloat16)


def test_raw_values_land_in_the_destination_rows(redis_server: servers.RedisServer) -> None:
    t = RedisTier(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:10]}")
    chunks = [_chunk(i) for i in range(3)]
    assert all(t.batched_put([(_key(i), c) for i, c in enumerate(chunks)]))
    out = _rows(64, 3)
    into = [out[:, :, 64 * i : 64 * (i + 1)] for i in range(3)]
    got = t.batched_get_into([_key(0), _key(1), _key(2), _key(9)], [*into, None])
    assert got[3] is None
    for i in range(3):
        c = got[i]
        assert c is not None and c.kv is into[i], "received into the caller's rows"
        assert torch.equal(out[:, :, 64 * i : 64 * (i + 1)], chunks[i].kv)
        assert c.fingerprint == chunks[i].fingerprint and c.num_tokens == 64
    t.close()


def test_a_corrupt_payload_received_in_place_is_a_miss_and_deleted(redis_server: servers.RedisServer) -> None:
    p = f"t{uuid.uuid4().hex[:10]}"
    t = RedisTier(redis_server.url, key_prefix=p)
    assert t.put(_key(1), _chunk(1))
    r = redis.Redis(host="127.0.0.1", port=redis_server.port, password=redis_server.password)
    part = f"{p}:{{{_key(1).hex()}}}:0"
    v = bytearray(r.get(part))
    v[100] ^= 0x01  # one flipped bit, same length: it lands in place, the checksum must catch it
    r.set(part, bytes(v))
    out = _rows(64, 1)
    assert t.batched_get_into([_key(1)], [out]) == [None]
    assert t.stats().errors == 1 and not r.exists(part)
    t.close()


@pytest.mark.parametrize("case", ["lz4", "split", "shape"])
def test_values_that_cannot_land_in_place_are_decoded_as_usual(
    redis_server: servers.RedisServer, case: str
) -> None:
    if case == "lz4":
        pytest.importorskip("lz4")
    kw = {"serde_name": "lz4"} if case == "lz4" else {"max_value_bytes": 4096} if case == "split" else {}
    t = RedisTier(redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:10]}", **kw)  # type: ignore[arg-type]
    c = _chunk(3)
    assert t.put(_key(3), c)
    dest = _rows(32, 1) if case == "shape" else _rows(64, 1)
    (got,) = t.batched_get_into([_key(3)], [dest])
    assert got is not None and got.kv is not dest and torch.equal(got.kv, c.kv)
    t.close()


def test_engine_retrieve_into_out_through_redis_equals_what_was_stored(
    redis_server: servers.RedisServer,
) -> None:
    cfg = Config.load(
        env={},
        chunk__chunk_tokens=64,
        cpu__enabled=False,
        remote__url=redis_server.url,
        remote__key_prefix=f"t{uuid.uuid4().hex[:10]}",
    )
    eng = CacheEngine(cfg, namespace=Namespace("m", "bfloat16", (4, 2, 16)))
    toks = list(range(1000, 1192))
    kv = torch.randn(4, 2, 192, 2, 16).to(torch.bfloat16)
    assert eng.store(toks, kv) == 192
    out = torch.zeros_like(kv)
    r = eng.retrieve(toks, out=out)
    assert r.num_tokens == 192 and torch.equal(out, kv)
    eng.close()
