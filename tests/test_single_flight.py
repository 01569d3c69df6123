"""Single-flight loads: N concurrent requests for chunks that fell out of the top tier cause ONE
read of each chunk from the lower tier, not N (issue 22; vLLM's own offloading loses ~40 % when
50 requests share a prefix). Real CPU + disk tiers; the disk made slow so the requests overlap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from tests.conftest import make_kv

from kvtier.chunk import Chunk
from kvtier.storage import TierManager
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.fault import FaultSpec, FaultTier

CHUNKS, REQUESTS = 8, 16


def test_concurrent_gets_read_each_lower_chunk_once(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", 256 * 1024**2)
    slow = FaultTier(disk, FaultSpec(latency_s=0.02))  # overlap the requests whatever the CPU speed
    mgr = TierManager([CPUTier(64 * 1024**2), slow])
    keys = [i.to_bytes(16, "big") for i in range(CHUNKS)]
    kvs = [make_kv(16, seed=i) for i in range(CHUNKS)]
    for k, kv in zip(keys, kvs):
        assert disk.put(k, Chunk(kv, b"fp", 16))  # below only: missing from the top tier
    start = threading.Barrier(REQUESTS)
    wrong: list[int] = []
    served: list[int] = []

    def request() -> None:
        start.wait()
        got = mgr.get_prefix(keys)
        served.append(len(got))
        for i, c in enumerate(got):
            with c:
                if not torch.equal(c.kv, kvs[i]):
                    wrong.append(i)

    t0 = time.monotonic()
    threads = [threading.Thread(target=request) for _ in range(REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    reads = disk.stats().hits + disk.stats().misses
    print(
        f"\nsingle-flight: {REQUESTS} requests x {CHUNKS} chunks: {reads} disk reads "
        f"(without single-flight up to {REQUESTS * CHUNKS}), {took * 1000:.0f} ms"
    )
    assert served == [CHUNKS] * REQUESTS and not wrong
    assert reads == CHUNKS
    mgr.close()
