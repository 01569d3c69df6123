"""Read-ahead of lower-tier chunks (``TierManager.iter_prefix``, issue 21's disk -> GPU row).

A retrieve from the disk tier used to read one chunk at a time; now up to ``read_ahead`` reads
are in flight. What must still hold: the result is bit-exact with the one-at-a-time path; a chunk
is handed out only after its checksum passed (a corrupt file mid-prefix is a miss there, the
prefix ends before it, and the chunks past it stay on disk, readable); every buffer a read-ahead
took goes back to the pool, also when the consumer stops early.

Chunks are 8 MiB so the disk tier's pipelined read (``disk_io.pipelined_read``) is the one used.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.config import Config, StorageConfig
from kvtier.engine import CacheEngine
from kvtier.serde import HEADER_BYTES
from kvtier.storage import READ_AHEAD, TierManager
from kvtier.tiers import disk_io
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.disk import DiskTier

L, H, D, CT, N = 4, 8, 128, 256, 6
CHUNK_BYTES = L * 2 * CT * H * D * 4  # float32: 8 MiB
assert disk_io.pipelined(CHUNK_BYTES)


def _engine(path: Path) -> CacheEngine:
    cfg = Config.load(
        env={},
        chunk_tokens=CT,
        cpu__max_bytes=f"{(N + 1) * CHUNK_BYTES // 2**20}MiB",
        cpu__pin_memory="no",
        disk__enabled=True,
        disk__path=str(path),
        disk__read_buffer_bytes=(N + 2) * CHUNK_BYTES,
        storage__promote_on_hit=False,  # every retrieve reads the disk
        model__model_id="m",
        model__kv_dtype="float32",
        model__num_layers=L,
        model__num_kv_heads=H,
        model__head_dim=D,
    )
    return CacheEngine(cfg)


def _store(path: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` chunks of random KV stored (flushed) in a disk tier at ``path``: (tokens, kv)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30000, (CT * N,), generator=g)
    kv = torch.randn((L, 2, CT * N, H, D), generator=g)
    with _engine(path) as e:
        assert e.store(tokens, kv) == CT * N
        assert e.flush(60)
    return tokens, kv


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    path = tmp_path_factory.mktemp("ra") / "disk"
    return (path, *_store(path, 0))


def _disk(e: CacheEngine) -> DiskTier:
    disk = e.storage.tiers[1]
    assert isinstance(disk, DiskTier) and disk.read_buffers is not None
    return disk


def test_read_ahead_is_bit_exact_with_one_at_a_time(stored: tuple[Path, torch.Tensor, torch.Tensor]) -> None:
    path, tokens, kv = stored
    with _engine(path) as e:
        pool = _disk(e).read_buffers
        assert pool is not None and e.storage.read_ahead == READ_AHEAD > 0
        outs = []
        for ahead in (READ_AHEAD, 0, 1, N + 3):
            e.storage.read_ahead = ahead
            out = torch.zeros_like(kv)
            r = e.retrieve(tokens, out=out)
            assert r.num_tokens == CT * N
            outs.append(out)
            assert pool.used_bytes == 0 and pool.failed_allocations == 0
        for out in outs:
            assert torch.equal(out, kv)
        assert _disk(e).stats().hits == 4 * N


def _corrupt(path: Path) -> None:
    """Flip one payload byte in the second 4 MiB piece (a read-ahead's hasher sees it late)."""
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + disk_io.PIECE_BYTES + 12345)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


def test_a_corrupt_file_mid_prefix_is_a_miss_and_read_ahead_is_released(tmp_path: Path) -> None:
    tokens, kv = _store(tmp_path, 1)
    with _engine(tmp_path) as e:
        disk = _disk(e)
        keys = e.keys(tokens)
        _corrupt(disk._path(keys[2].digest))
        out = torch.full_like(kv, -7.0)
        r = e.retrieve(tokens, out=out)
        assert r.num_tokens == 2 * CT and r.num_chunks == 2  # the corrupt chunk ends the prefix
        assert torch.equal(out[:, :, : 2 * CT], kv[:, :, : 2 * CT])
        assert bool((out[:, :, 2 * CT :] == -7.0).all())  # rows past the hole: never written
        pool = disk.read_buffers
        assert pool is not None and pool.used_bytes == 0 and pool.failed_allocations == 0
        pool.check_invariants()
        s = disk.stats()
        assert s.errors == 1 and not disk.contains(keys[2].digest)
        for k in keys[3:]:  # read ahead past the hole, released; still on disk, still served
            assert disk.contains(k.digest)
            c = disk.get(k.digest)
            assert c is not None
            with c:
                assert torch.equal(c.kv, kv[:, :, k.start : k.end])
        assert pool.used_bytes == 0


class _CountingDisk(DiskTier):
    """The real disk tier, counting how many of its ``get``s run at once (each held 20 ms longer,
    so reads that are in flight together are seen together on a loaded 2-core machine)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._now = 0
        self.most = 0
        self._count_lock = threading.Lock()

    def get(self, key: bytes) -> Chunk | None:
        with self._count_lock:
            self._now += 1
            self.most = max(self.most, self._now)
        try:
            time.sleep(0.02)
            return super().get(key)
        finally:
            with self._count_lock:
                self._now -= 1


def _manager(path: Path) -> tuple[TierManager, _CountingDisk, list[bytes], list[torch.Tensor]]:
    disk = _CountingDisk(path, 1 << 30, read_buffer_bytes=8 * CHUNK_BYTES)
    tm = TierManager([CPUTier(1 << 20), disk], StorageConfig(promote_on_hit=False))
    g = torch.Generator().manual_seed(2)
    keys = [bytes([i + 1]) * 16 for i in range(N)]
    kvs = [torch.randn((L, 2, CT, H, D), generator=g) for _ in range(N)]
    for k, kv in zip(keys, kvs):
        assert disk.put(k, Chunk(kv, b"f" * 16, CT))
    return tm, disk, keys, kvs


def test_lower_tier_reads_overlap_and_come_out_in_order(tmp_path: Path) -> None:
    tm, disk, keys, kvs = _manager(tmp_path)
    try:
        tm.read_ahead = 0
        got = list(tm.iter_prefix(keys))
        assert disk.most == 1  # the old path: one read at a time
        for c in got:
            c.release()
        disk.most = 0
        tm.read_ahead = 3
        got = list(tm.iter_prefix(keys))
        assert disk.most >= 2  # before the change: 1
        assert [torch.equal(c.kv, kv) for c, kv in zip(got, kvs)] == [True] * N
        for c in got:
            c.release()
        assert disk.read_buffers is not None and disk.read_buffers.used_bytes == 0
    finally:
        tm.close()


def test_stopping_early_waits_for_and_releases_the_reads_ahead(tmp_path: Path) -> None:
    tm, disk, keys, kvs = _manager(tmp_path)
    pool = disk.read_buffers
    assert pool is not None
    try:
        tm.read_ahead = 4
        it = tm.iter_prefix(keys)
        first = next(it)
        assert torch.equal(first.kv, kvs[0])
        it.close()  # chunks 1..4 were being read ahead: waited for, then released
        assert pool.used_bytes == pool.capacity_bytes - pool.free_bytes  # consistent
        assert pool.used_bytes == disk_io_aligned(CHUNK_BYTES)  # only the one we hold
        first.release()
        assert pool.used_bytes == 0
        pool.check_invariants()
    finally:
        tm.close()


def disk_io_aligned(n: int) -> int:
    """What one ``n``-byte read buffer takes from the pool (its allocation unit)."""
    from kvtier.memory import _align

    return _align(n)
