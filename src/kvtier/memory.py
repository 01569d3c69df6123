"""Host buffer pool: one large allocation carved into chunk-sized, reference-counted objects.

Why one allocation: pinning (page-locking) host memory is slow and fragments the address space
when done per chunk; a single pinned arena is pinned once and every chunk in it is a view, so a
GPU copy from or to any chunk runs at pinned-memcpy speed with no per-chunk setup.

Allocator: first-fit over an offset-sorted free list with coalescing of neighbours on free.
Chunks of one model are mostly the same size (full chunks) plus a few smaller tails, so
first-fit keeps fragmentation low and the free list short. All offsets are aligned to
``ALIGN_BYTES`` so any dtype view is aligned.

Invariants:
* free extents never overlap, are sorted by offset and never touch (neighbours are merged);
  used + free == capacity.
* ``allocate`` returns ``None`` when no extent fits — the caller evicts and retries; the pool
  never raises for lack of space and never grows.
* A ``MemoryObject``'s bytes return to the pool only when it has been released by its owner
  *and* no reader holds a pin (``ref_count == 0``); a pin taken by a reader expires after its
  timeout so a crashed reader cannot leak memory forever.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvtier.errors import KVTierError

ALIGN_BYTES = 256


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def should_pin(mode: str) -> bool:
    """Resolve ``auto|yes|no``: pin only where a CUDA device can use it."""
    if mode == "yes":
        return True
    if mode == "no":
        return False
    return torch.cuda.is_available()


class PoolError(KVTierError, ValueError):
    """A host buffer pool asked for an impossible size or arena."""


@dataclass
class MemoryObject:
    """One chunk's bytes inside the pool, viewed as a tensor of ``shape``/``dtype``.

    ``ref_count`` counts live readers (pins). ``released`` is set by the owner (the tier) when
    the chunk is evicted; the bytes are freed once both conditions hold.
    """

    pool: HostBufferPool
    offset: int
    nbytes: int
    tensor: torch.Tensor
    ref_count: int = 0
    released: bool = False
    pin_deadlines: list[float] = field(default_factory=list)

    def pin(self, timeout_s: float | None = None) -> MemoryObject:
        """Take a reader reference; it lapses after ``timeout_s`` (pool default when None)."""
        self.pool._pin(self, timeout_s)
        return self

    def unpin(self) -> None:
        """Drop one reader reference taken with ``pin``."""
        self.pool._unpin(self)

    @property
    def pinned(self) -> bool:
        return self.pool._is_pinned(self)


class HostBufferPool:
    """A fixed arena of ``capacity_bytes`` host memory (page-locked when ``pin``)."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        pin: bool = False,
        pin_timeout_s: float = 60.0,
        clock: Callable[[], float] | None = None,
        arena: torch.Tensor | None = None,
    ) -> None:
        """``arena``: a flat uint8 tensor of ``capacity_bytes`` to manage instead of a fresh one
        (the daemon's shared-memory segment); it must be ``ALIGN_BYTES``-aligned in size."""
        if capacity_bytes <= 0:
            raise PoolError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = _align(capacity_bytes)
        self.pin_timeout_s = pin_timeout_s
        self._clock = clock or time.monotonic
        if arena is not None and (arena.dtype != torch.uint8 or arena.numel() != self.capacity_bytes):
            raise PoolError(f"arena of {arena.numel()} bytes is not {ALIGN_BYTES}-aligned uint8 memory")
        self._arena = (
            arena
            if arena is not None
            else torch.empty(self.capacity_bytes, dtype=torch.uint8, pin_memory=pin)
        )
        self.pinned_memory = bool(pin)
        self._free: list[tuple[int, int]] = [(0, self.capacity_bytes)]  # (offset, size), sorted
        self._used = 0
        self.failed_allocations = 0
        """``allocate`` calls that found no extent (the caller evicted, or fell back elsewhere)."""
        self._lock = threading.RLock()

    # -- allocation -------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> MemoryObject | None:
        """A new object of ``shape``/``dtype``, or ``None`` if no free extent is large enough."""
        nbytes = _numel(shape) * dtype.itemsize
        size = _align(max(nbytes, 1))
        with self._lock:
            for i, (off, ext) in enumerate(self._free):
                if ext >= size:
                    if ext == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, ext - size)
                    self._used += size
                    break
            else:
                self.failed_allocations += 1
                return None
        view = self._arena[off : off + nbytes].view(dtype).view(shape)
        return MemoryObject(self, off, size, view)

    def release(self, obj: MemoryObject) -> None:
        """The owner is done with ``obj``; its bytes are freed now or when the last pin drops."""
        with self._lock:
            if obj.released:
                return
            obj.released = True
            self._maybe_free(obj)

    def _maybe_free(self, obj: MemoryObject) -> None:
        self._expire(obj)
        if obj.released and obj.ref_count == 0 and obj.nbytes:
            self._insert_free(obj.offset, obj.nbytes)
            self._used -= obj.nbytes
            obj.nbytes = 0  # marks "returned"; a second free is a no-op

    def _insert_free(self, off: int, size: int) -> None:
        i = bisect.bisect_left(self._free, (off, 0))
        # merge with the right neighbour, then the left one
        if i < len(self._free) and off + size == self._free[i][0]:
            size += self._free[i][1]
            del self._free[i]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
            off = self._free[i - 1][0]
            size += self._free[i - 1][1]
            del self._free[i - 1]
            i -= 1
        self._free.insert(i, (off, size))

    # -- pins ---------------------------------------------------------------------------------
    def _pin(self, obj: MemoryObject, timeout_s: float | None) -> None:
        with self._lock:
            obj.ref_count += 1
            obj.pin_deadlines.append(self._clock() + (self.pin_timeout_s if timeout_s is None else timeout_s))

    def _unpin(self, obj: MemoryObject) -> None:
        with self._lock:
            if obj.ref_count > 0:
                obj.ref_count -= 1
                obj.pin_deadlines.pop(0)
            self._maybe_free(obj)

    def _expire(self, obj: MemoryObject) -> None:
        now = self._clock()
        live = [d for d in obj.pin_deadlines if d > now]
        if len(live) != len(obj.pin_deadlines):
            obj.pin_deadlines = live
            obj.ref_count = len(live)

    def _is_pinned(self, obj: MemoryObject) -> bool:
        with self._lock:
            self._expire(obj)
            return obj.ref_count > 0

    def reap(self, objs: list[MemoryObject]) -> None:
        """Free released objects whose pins have all expired (called by the owner periodically)."""
        with self._lock:
            for o in objs:
                self._maybe_free(o)

    # -- accounting ---------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._used

    def largest_free_extent(self) -> int:
        with self._lock:
            return max((s for _, s in self._free), default=0)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the free list is inconsistent (used by tests)."""
        with self._lock:
            total = 0
            prev_end = -1
            for off, size in self._free:
                assert size > 0 and off % ALIGN_BYTES == 0, (off, size)
                assert off > prev_end, "free extents overlap or touch without being merged"
                prev_end = off + size
                total += size
            assert prev_end <= self.capacity_bytes
            assert total + self._used == self.capacity_bytes, (total, self._used, self.capacity_bytes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
