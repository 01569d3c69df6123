"""The daemon evicts in the same order as an in-process cache on the same trace (issue 13).

The daemon's put path commits a client's chunk into its shared CPU tier itself, then hands it to
the lower tiers. It used to do that with ``TierManager.put``, whose top-tier put found the key
and counted an access: every fresh chunk looked hot to ARC and S3-FIFO, so the daemon evicted in
another order than the same config in process. Both sides here are the real classes — the
daemon's ``CacheService`` answering protocol messages, and ``TierManager`` over ``CPUTier`` +
``DiskTier`` — with a disk tier below the CPU tier in both (the path that double-counted).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.config import Config
from kvtier.server.service import CacheService
from kvtier.storage import TierManager
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.disk import DiskTier
from kvtier.wire import protocol as P

CHUNK = (2, 2, 16, 2, 32)  # float32: 16 KiB per chunk
NBYTES = 2 * 2 * 16 * 2 * 32 * 4
CAPACITY = 8 * NBYTES  # the CPU tier holds 8 chunks


def trace() -> list[tuple[str, int]]:
    """Puts of 40 keys with re-reads of a hot set in between: enough to make ARC/S3-FIFO's
    frequency bookkeeping decide the order."""
    ops: list[tuple[str, int]] = []
    for i in range(40):
        ops.append(("put", i))
        if i % 3 == 2:
            ops += [("get", i - 2), ("get", i - 1)]
        if i % 5 == 4:
            ops += [("get", 0), ("get", 1)]
    return ops


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def kv(i: int) -> torch.Tensor:
    return torch.full(CHUNK, float(i))


def in_process_order(policy: str, tmp: Path) -> list[bytes]:
    cpu = CPUTier(CAPACITY, policy=policy, pin_memory=False)
    order: list[bytes] = []
    cpu.on_evict.append(lambda k, n: order.append(k))
    cfg = Config.load(env={})
    mgr = TierManager([cpu, DiskTier(tmp, 64 * NBYTES)], cfg.storage)
    for op, i in trace():
        if op == "put":
            mgr.put(key(i), Chunk(kv(i), b"f" * 8, 16))
            assert mgr.flush(30)  # lower-tier writes land before the next read: no timing in the trace
        else:
            c = mgr.get(key(i))
            if c is not None:
                c.release()
    mgr.flush(30)
    mgr.close()
    return order


def daemon_order(policy: str, tmp: Path) -> list[bytes]:
    cfg = Config.load(
        env={},
        cpu__max_bytes=CAPACITY,
        cpu__eviction_policy=policy,
        disk__enabled=True,
        disk__path=str(tmp),
        disk__max_disk_bytes=64 * NBYTES,
    )
    svc = CacheService(cfg)
    order: list[bytes] = []
    svc.cpu.on_evict.append(lambda k, n: order.append(k))
    s = svc.new_session("test")
    meta = P.ItemMeta(b"f" * 8, 16, list(CHUNK), "float32")
    for op, i in trace():
        if op == "put":
            payload = kv(i).numpy().tobytes()
            reply = svc.handle(s, P.Put([P.PutItem(key(i), meta, 0)]), payload)[0]
            assert isinstance(reply, P.Bools) and reply.values == [True]
            assert svc.manager.flush(30)
        else:
            _, _, after = svc.handle(s, P.Get([key(i)], shm=False), None)
            for release in after:
                release()
    svc.manager.flush(30)
    svc.end_session(s)
    svc.close()
    return order


@pytest.mark.parametrize("policy", ["arc", "s3fifo", "lru", "lfu"])
def test_daemon_evicts_like_in_process(policy: str, tmp_path: Path) -> None:
    here = in_process_order(policy, tmp_path / "a")
    there = daemon_order(policy, tmp_path / "b")
    assert len(here) >= 20  # the trace really evicts
    assert there == here
