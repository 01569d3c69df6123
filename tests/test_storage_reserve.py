"""TierManager.reserve/commit: the in-place put a GPU store uses (DMA straight into the pool)."""

from __future__ import annotations

from pathlib import Path

import torch

from kvtier.config import StorageConfig
from kvtier.storage import TierManager
from kvtier.tiers.cpu import CPUTier, Reservation
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.mirror import MirrorTier


def test_reserved_chunk_is_invisible_until_committed_then_reaches_the_lower_tier(tmp_path: Path) -> None:
    tm = TierManager([CPUTier(1 << 20), DiskTier(tmp_path / "disk", 1 << 22)], StorageConfig())
    try:
        kv = torch.arange(2 * 2 * 8 * 4, dtype=torch.float32).view(2, 2, 8, 1, 4)
        r = tm.reserve(b"k" * 16, tuple(kv.shape), kv.dtype, b"fp", 8)
        assert isinstance(r, Reservation)
        assert tm.get(b"k" * 16) is None  # not visible before commit
        r.obj.tensor.copy_(kv)  # what the DMA does
        assert tm.commit(r)
        c = tm.get(b"k" * 16)
        assert c is not None and torch.equal(c.kv, kv) and c.fingerprint == b"fp"
        c.release()
        assert tm.flush(10)
        on_disk = tm.tiers[1].get(b"k" * 16)
        assert on_disk is not None and torch.equal(on_disk.kv, kv)
        on_disk.release()
        assert tm.reserve(b"k" * 16, tuple(kv.shape), kv.dtype, b"fp", 8) is True  # stored already
        big = tm.reserve(b"b" * 16, (1 << 21,), torch.uint8, b"fp", 8)
        assert big is False  # no room: a failed put
        r2 = tm.reserve(b"a" * 16, tuple(kv.shape), kv.dtype, b"fp", 8)
        assert isinstance(r2, Reservation)
        tm.abort(r2)
        assert tm.get(b"a" * 16) is None
        top = tm.tiers[0]
        assert isinstance(top, CPUTier)
        top.pool.check_invariants()
    finally:
        tm.close()


def test_a_top_tier_that_cannot_reserve_says_none() -> None:
    tm = TierManager([MirrorTier(16), CPUTier(1 << 20)], StorageConfig())
    try:
        assert tm.reserve(b"k" * 16, (4,), torch.float32, b"fp", 1) is None
    finally:
        tm.close()
