"""The daemon's CPU tier over the shared segment: a reserve/commit put path for same-host clients.

Server-side only (the segment itself, which clients also map, is ``kvtier.wire.shm``). It is the
ordinary ``CPUTier`` whose pool arena is the segment's, plus the public reserve/commit pair of
``CPUTier`` that lets a client copy its KV straight into pool space.

Invariant: reserved space is invisible (no reader, no eviction) until ``commit``; ``abort``
returns it, so a dead client never leaks pool space.
"""

from __future__ import annotations

from kvtier.tiers.cpu import CPUTier, Reservation
from kvtier.wire.shm import SharedSegment

__all__ = ["Reservation", "SharedCPUTier"]


class SharedCPUTier(CPUTier):
    """The CPU tier with its pool arena in a ``SharedSegment``."""

    name = "cpu"

    def __init__(self, segment: SharedSegment, *, policy: str = "lru", pin_timeout_s: float = 60.0) -> None:
        # HostBufferPool(arena=) refuses an arena that is not exactly the aligned capacity (PoolError)
        super().__init__(
            segment.arena_bytes,
            policy=policy,
            pin_memory=False,
            pin_timeout_s=pin_timeout_s,
            arena=segment.arena,
        )
        self.segment = segment

    def close(self) -> None:
        super().close()
        self.segment.close()
