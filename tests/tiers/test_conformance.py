"""One suite, every tier: the contract of ``kvtier.tiers.base.Tier``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.tiers.base import Tier

SHAPE = (2, 2, 8, 2, 4)  # layers, k/v, tokens, heads, dim
CHUNK_BYTES = 2 * 2 * 8 * 2 * 4 * 4


def _chunk(seed: int, dtype: torch.dtype = torch.float32) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    return Chunk(torch.randn(SHAPE, generator=g).to(dtype), seed.to_bytes(8, "little"), SHAPE[2])


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_put_get_round_trip(make_tier: Callable[[int], Tier]) -> None:
    tier = make_tier(1 << 20)
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        c = _chunk(i, dtype)
        assert tier.put(_key(i), c)
        got = tier.get(_key(i))
        assert got is not None
        with got:
            assert got.fingerprint == c.fingerprint and got.num_tokens == c.num_tokens
            assert got.kv.dtype == dtype and torch.equal(got.kv, c.kv)


def test_put_copies_a_strided_view(make_tier: Callable[[int], Tier]) -> None:
    tier = make_tier(1 << 20)
    big = torch.randn(2, 2, 32, 2, 4)
    view = big[:, :, 8:16]
    assert tier.put(_key(1), Chunk(view, b"fp", 8))
    big.zero_()  # the tier must have copied
    got = tier.get(_key(1))
    assert got is not None and not torch.equal(got.kv, big[:, :, 8:16])
    got.release()


def test_missing_key_contains_remove(make_tier: Callable[[int], Tier]) -> None:
    tier = make_tier(1 << 20)
    assert not tier.contains(_key(5)) and tier.get(_key(5)) is None
    assert not tier.remove(_key(5))
    tier.put(_key(5), _chunk(5))
    assert tier.contains(_key(5))
    assert tier.remove(_key(5))
    assert not tier.contains(_key(5)) and tier.get(_key(5)) is None


def test_batched_defaults_and_prefix(make_tier: Callable[[int], Tier]) -> None:
    tier = make_tier(1 << 20)
    assert tier.batched_put([(_key(i), _chunk(i)) for i in range(4)]) == [True] * 4
    tier.remove(_key(2))
    assert tier.prefix_contains([_key(i) for i in range(4)]) == 2
    got = tier.batched_get([_key(0), _key(2), _key(3)])
    assert got[0] is not None and got[1] is None and got[2] is not None
    assert torch.equal(got[2].kv, _chunk(3).kv)
    for c in got:
        if c is not None:
            c.release()


def test_capacity_is_respected(make_tier: Callable[[int], Tier]) -> None:
    tier = make_tier(CHUNK_BYTES * 3 + 512)
    if not getattr(tier, "capacity_enforced", True):
        pytest.skip(f"{tier.name}: capacity is the store's (maxmemory / lifecycle rules), not the client's")
    for i in range(10):
        tier.put(_key(i), _chunk(i))
    s = tier.stats()
    assert s.bytes_used <= s.capacity_bytes
    assert 1 <= s.chunks <= 3
    assert tier.contains(_key(9))  # the newest is kept
    got = tier.get(_key(9))
    assert got is not None and torch.equal(got.kv, _chunk(9).kv)
    got.release()


def test_stats_count(make_tier: Callable[[int], Tier]) -> None:
    tier = make_tier(1 << 20)
    tier.put(_key(1), _chunk(1))
    c = tier.get(_key(1))
    assert c is not None
    c.release()
    tier.get(_key(2))
    s = tier.stats()
    assert s.puts == 1 and s.hits == 1 and s.misses == 1 and s.chunks == 1
