"""TierManager over a real CPU tier and a real disk tier: promotion, async writes, write-back,
prefetch, backpressure, soft failures. A gated wrapper (a fake, in addition) makes queue states
deterministic."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.config import StorageConfig
from kvtier.storage import TierManager
from kvtier.tiers.base import Tier, TierStats
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.disk import DiskTier

SHAPE = (2, 2, 16, 2, 8)
CHUNK_BYTES = 2 * 2 * 16 * 2 * 8 * 4  # fp32: 4 KiB


def _chunk(seed: int) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    return Chunk(torch.randn(SHAPE, generator=g), seed.to_bytes(8, "little"), SHAPE[2])


def _key(i: int) -> bytes:
    return bytes([i % 256]) + i.to_bytes(15, "big")


def _manager(tmp_path: Path, *, cpu_bytes: int = 1 << 20, **cfg: object) -> TierManager:
    return TierManager([CPUTier(cpu_bytes), DiskTier(tmp_path / "disk", 1 << 22)], StorageConfig(**cfg))  # type: ignore[arg-type]


class Gated(Tier):
    """Delegates to ``inner``; ``put`` waits until ``gate`` is set (a slow tier on demand)."""

    def __init__(self, inner: Tier) -> None:
        self.inner, self.name = inner, inner.name
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def contains(self, key: bytes) -> bool:
        return self.inner.contains(key)

    def get(self, key: bytes) -> Chunk | None:
        return self.inner.get(key)

    def put(self, key: bytes, chunk: Chunk) -> bool:
        self.entered.release()
        assert self.gate.wait(30)
        return self.inner.put(key, chunk)

    def remove(self, key: bytes) -> bool:
        return self.inner.remove(key)

    def stats(self) -> TierStats:
        return self.inner.stats()

    def close(self) -> None:
        self.gate.set()
        self.inner.close()


def test_write_through_reaches_disk_after_flush(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    src = [_chunk(i) for i in range(6)]
    for i, c in enumerate(src):
        assert m.put(_key(i), c)
    want = [c.kv.clone() for c in src]
    for c in src:
        c.kv.fill_(7.0)  # the caller reuses its buffers at once: queued writes must not see this
    assert m.flush(30)
    disk = m.tiers[1]
    for i in range(6):
        got = disk.get(_key(i))
        assert got is not None and torch.equal(got.kv, want[i])
    s = m.stats()
    assert s["disk"].puts == 6 and s["disk"].queue_depth == 0 and s["disk"].written_bytes == 6 * CHUNK_BYTES
    assert s["disk"].put_seconds > 0
    m.close()


def test_hit_in_lower_tier_is_promoted(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    cpu, disk = m.tiers
    disk.put(_key(1), _chunk(1))
    assert m.prefix_lookup([_key(1)]) == 1 and not cpu.contains(_key(1))
    got = m.get(_key(1))
    assert got is not None and torch.equal(got.kv, _chunk(1).kv)
    got.release()
    assert cpu.contains(_key(1))
    again = m.get(_key(1))
    assert again is not None and torch.equal(again.kv, _chunk(1).kv)
    again.release()
    s = m.stats()
    assert s["disk"].promotions == 1 and s["disk"].hits == 1 and s["cpu"].hits == 1
    assert s["disk"].read_bytes == CHUNK_BYTES and s["disk"].get_seconds > 0
    m.close()


def test_no_promotion_when_disabled(tmp_path: Path) -> None:
    m = _manager(tmp_path, promote_on_hit=False)
    m.tiers[1].put(_key(1), _chunk(1))
    c = m.get(_key(1))
    assert c is not None
    c.release()
    assert not m.tiers[0].contains(_key(1))
    m.close()


def test_prefix_lookup_spans_tiers_and_stops_at_a_hole(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    cpu, disk = m.tiers
    cpu.put(_key(0), _chunk(0))
    disk.put(_key(1), _chunk(1))
    cpu.put(_key(2), _chunk(2))
    disk.put(_key(4), _chunk(4))
    assert m.prefix_lookup([_key(i) for i in range(5)]) == 3
    m.close()


def test_write_back_writes_lower_tiers_on_eviction_and_close(tmp_path: Path) -> None:
    m = _manager(tmp_path, cpu_bytes=2 * CHUNK_BYTES, write_mode="write_back")
    disk = m.tiers[1]
    m.put(_key(0), _chunk(0))
    m.put(_key(1), _chunk(1))
    assert m.flush(30) and disk.stats().chunks == 0  # nothing evicted yet: nothing written below
    m.put(_key(2), _chunk(2))  # evicts 0
    m.put(_key(3), _chunk(3))  # evicts 1
    assert m.flush(30)
    assert disk.contains(_key(0)) and disk.contains(_key(1)) and not disk.contains(_key(2))
    got = disk.get(_key(0))
    assert got is not None and torch.equal(got.kv, _chunk(0).kv)
    m.close()  # writes back what the CPU tier still holds
    with DiskTier(tmp_path / "disk", 1 << 22) as reopened:
        for i in range(4):
            c = reopened.get(_key(i))
            assert c is not None and torch.equal(c.kv, _chunk(i).kv), i


def test_write_back_skips_chunks_that_came_from_below(tmp_path: Path) -> None:
    m = _manager(tmp_path, cpu_bytes=1 * CHUNK_BYTES, write_mode="write_back")
    disk = m.tiers[1]
    disk.put(_key(0), _chunk(0))
    c = m.get(_key(0))  # promoted into the CPU tier
    assert c is not None
    c.release()
    puts_before = disk.stats().puts
    m.put(_key(1), _chunk(1))  # evicts the promoted chunk: already on disk, not rewritten
    assert m.flush(30) and disk.stats().puts == puts_before
    m.close()


def _cpu_disk_config(tmp_path: Path) -> Config:
    """A 16 MiB unpinned CPU tier over a disk tier in ``tmp_path/d``, 16-token chunks."""
    return Config.load(
        env={},
        chunk_tokens=16,
        cpu__max_bytes="16MiB",
        cpu__pin_memory="no",
        disk__enabled=True,
        disk__path=str(tmp_path / "d"),
        model__model_id="m",
    )


def test_prefetch_then_retrieve_hits_cpu(tmp_path: Path) -> None:
    cfg = _cpu_disk_config(tmp_path)
    tokens = torch.randint(0, 1000, (16 * 6,), generator=torch.Generator().manual_seed(0))
    kv = torch.randn(2, 2, 16 * 6, 2, 8)
    with CacheEngine(cfg) as eng:
        assert eng.store(tokens, kv) == 96
        assert eng.flush(30)
    with CacheEngine(cfg) as eng:  # restart: the CPU tier is empty
        eng.bind_model(2, 2, 8, torch.float32)
        assert eng.storage.top.stats().chunks == 0
        assert eng.prefetch(tokens).result(30) == 6
        assert eng.storage.top.stats().chunks == 6
        disk_hits = eng.stats().tiers["disk"].hits
        r = eng.retrieve(tokens)
        assert r.num_tokens == 96 and r.kv is not None and torch.equal(r.kv, kv)
        s = eng.stats().tiers
        assert s["disk"].hits == disk_hits and s["cpu"].hits == 6 and s["disk"].promotions == 6
        assert eng.prefetch(tokens).result(30) == 0  # already on top: nothing to do


def test_prefetch_stops_at_a_hole(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    disk = m.tiers[1]
    for i in (0, 1, 3):
        disk.put(_key(i), _chunk(i))
    assert m.prefetch([_key(i) for i in range(4)]).result(30) == 2
    assert not m.tiers[0].contains(_key(3))
    m.close()


def test_get_waits_for_an_inflight_prefetch(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", 1 << 22)
    disk.put(_key(1), _chunk(1))
    slow_read = threading.Event()
    real_batched_get = disk.batched_get

    def gated_batched_get(keys: list[bytes]) -> list[Chunk | None]:
        assert slow_read.wait(30)
        return real_batched_get(keys)

    disk.batched_get = gated_batched_get  # type: ignore[method-assign]
    m = TierManager([CPUTier(1 << 20), disk])
    fut = m.prefetch([_key(1)])
    result: list[Chunk | None] = []
    t = threading.Thread(target=lambda: result.append(m.get(_key(1))))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waiting for the prefetch, not reading the disk itself
    slow_read.set()
    t.join(30)
    assert fut.result(30) == 1 and result[0] is not None and torch.equal(result[0].kv, _chunk(1).kv)
    result[0].release()
    assert disk.stats().hits == 1  # read once, by the prefetch
    m.close()


def test_full_queue_blocks_then_drops(tmp_path: Path) -> None:
    gated = Gated(DiskTier(tmp_path / "disk", 1 << 22))
    m = TierManager([CPUTier(1 << 20), gated], StorageConfig(max_queue_chunks=1, queue_timeout_s=0.2))
    m.put(_key(0), _chunk(0))
    assert gated.entered.acquire(timeout=30)  # the worker holds job 0, waiting at the gate
    assert m.put(_key(1), _chunk(1))  # queued
    assert m.stats()["disk"].queue_depth == 1
    assert not m.flush(0.05)  # still pending
    assert m.put(_key(2), _chunk(2))  # blocks ~0.2 s, then dropped for disk; the CPU tier took it
    s = m.stats()["disk"]
    assert s.queue_drops == 1
    gated.gate.set()
    assert m.flush(30)
    assert [gated.contains(_key(i)) for i in range(3)] == [True, True, False]
    assert m.tiers[0].contains(_key(2))
    m.close()


def test_drop_mode_never_waits(tmp_path: Path) -> None:
    gated = Gated(DiskTier(tmp_path / "disk", 1 << 22))
    m = TierManager([CPUTier(1 << 20), gated], StorageConfig(max_queue_chunks=1, queue_full="drop"))
    m.put(_key(0), _chunk(0))
    assert gated.entered.acquire(timeout=30)
    m.put(_key(1), _chunk(1))
    for i in range(2, 6):
        m.put(_key(i), _chunk(i))
    assert m.stats()["disk"].queue_drops == 4
    gated.gate.set()
    m.close()


def test_remove_cancels_queued_writes(tmp_path: Path) -> None:
    gated = Gated(DiskTier(tmp_path / "disk", 1 << 22))
    m = TierManager([CPUTier(1 << 20), gated])
    m.put(_key(0), _chunk(0))
    assert gated.entered.acquire(timeout=30)
    m.put(_key(1), _chunk(1))
    assert m.remove(_key(1))  # from the CPU tier; its queued disk write must not resurrect it
    assert m.remove(_key(0))  # being written right now: undone after the write
    gated.gate.set()
    assert m.flush(30)
    assert not gated.contains(_key(0)) and not gated.contains(_key(1))
    m.put(_key(1), _chunk(1))  # a later put of the same key is written again
    assert m.flush(30) and gated.contains(_key(1))
    m.close()


def test_broken_disk_fails_soft_cpu_keeps_serving(tmp_path: Path) -> None:
    cfg = _cpu_disk_config(tmp_path)
    tokens = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    kv = torch.randn(2, 2, 64, 2, 8)
    with CacheEngine(cfg) as eng:
        shutil.rmtree(tmp_path / "d")  # the disk vanishes at run time
        assert eng.store(tokens, kv) == 64
        eng.flush(30)
        r = eng.retrieve(tokens)
        assert r.num_tokens == 64 and r.kv is not None and torch.equal(r.kv, kv)
        s = eng.stats().tiers["disk"]
        assert s.put_failures == 4 and s.chunks == 0


def test_engine_with_disk_survives_restart(tmp_path: Path) -> None:
    cfg = _cpu_disk_config(tmp_path)
    tokens = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2))
    kv = torch.randn(2, 2, 40, 2, 8)
    with CacheEngine(cfg) as eng:
        assert [t.name for t in eng.storage.tiers] == ["cpu", "disk"]
        eng.store(tokens, kv)
    with CacheEngine(cfg) as eng:  # close() drained the queue: all on disk
        eng.bind_model(2, 2, 8, torch.float32)
        assert eng.lookup(tokens) == 40
        r = eng.retrieve(tokens)
        assert r.num_tokens == 40 and r.kv is not None and torch.equal(r.kv, kv)
        assert eng.stats().tiers["disk"].promotions == 3


def test_write_back_needs_an_evicting_top_tier(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "a", 1 << 20)
    with pytest.raises(ValueError, match="write_back"):
        TierManager([disk, CPUTier(1 << 20)], StorageConfig(write_mode="write_back"))
    disk.close()


def test_per_tier_metrics_reach_prometheus(tmp_path: Path) -> None:
    cfg = _cpu_disk_config(tmp_path)
    with CacheEngine(cfg) as eng:
        eng.store(torch.arange(32), torch.randn(2, 2, 32, 2, 8))
        assert eng.flush(30)
        text = eng.metrics.render().decode()
    assert 'kvtier_tier_written_bytes_total{tier="disk"} 8192.0' in text
    assert 'kvtier_tier_queue_depth{tier="disk"} 0.0' in text
    assert 'kvtier_tier_put_seconds_total{tier="disk"}' in text


def test_prefetch_past_a_corrupt_chunk_loads_the_prefix_and_frees_buffers(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    disk = m.tiers[1]
    assert isinstance(disk, DiskTier)
    for i in range(4):
        disk.put(_key(i), _chunk(i))
    (tmp_path / "disk" / "01" / f"{_key(1).hex()}.kvc").unlink()  # behind the tier's back
    assert m.prefetch([_key(i) for i in range(4)]).result(30) == 1
    assert m.tiers[0].contains(_key(0)) and not m.tiers[0].contains(_key(2))
    assert disk._buffers is not None and disk._buffers.used_bytes == 0  # every read buffer given back
    m.close()


def test_disk_full_through_the_engine_is_counted_and_cpu_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = _cpu_disk_config(tmp_path)
    tokens = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(3))
    kv = torch.randn(2, 2, 48, 2, 8)
    with CacheEngine(cfg) as eng:
        monkeypatch.setattr(os, "writev", full)
        monkeypatch.setattr(os, "pwrite", full)
        assert eng.store(tokens, kv) == 48  # the CPU tier took it
        assert eng.flush(30)  # queue drained (the writes failed softly)
        s = eng.stats().tiers["disk"]
        assert s.put_failures == 3 and s.errors == 3 and s.chunks == 0 and s.queue_depth == 0
        r = eng.retrieve(tokens)
        assert r.num_tokens == 48 and r.kv is not None and torch.equal(r.kv, kv)
        monkeypatch.undo()
