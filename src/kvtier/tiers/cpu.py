"""The CPU tier: chunks in one host buffer pool (pinned when CUDA is present), evicted by policy.

A ``put`` copies the caller's (possibly strided) KV into a pool object — one copy, no staging.
A ``get`` hands out a *view* of the pool object pinned against eviction; the caller copies it
where it needs it and releases it. So a hit costs exactly one copy out, a store one copy in.

Why evict-until-it-fits rather than evict-until-under-budget: the pool is one arena, so what
matters is a free extent large enough for the new chunk, not the byte total; evicting by
policy order until ``allocate`` succeeds gives both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.chunk import Chunk
from kvtier.memory import HostBufferPool, MemoryObject
from kvtier.policies import make_policy
from kvtier.tiers.base import Tier, TierClosedError, TierStats

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    obj: MemoryObject
    fingerprint: bytes
    num_tokens: int


@dataclass
class Reservation:
    """Pool space held for one chunk between ``reserve`` and ``commit``/``abort``: invisible to
    readers and to eviction until committed."""

    key: bytes
    obj: MemoryObject
    fingerprint: bytes
    num_tokens: int


class CPUTier(Tier):
    """In-memory tier of ``max_bytes`` with an eviction ``policy`` (lru|lfu|arc|s3fifo)."""

    name = "cpu"

    def __init__(
        self,
        max_bytes: int,
        *,
        policy: str = "lru",
        pin_memory: bool = False,
        pin_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        arena: torch.Tensor | None = None,
    ) -> None:
        self.pool = HostBufferPool(
            max_bytes, pin=pin_memory, pin_timeout_s=pin_timeout_s, clock=clock, arena=arena
        )
        self.policy = make_policy(policy, clock=clock)
        self._entries: dict[bytes, _Entry] = {}
        self._zombies: list[MemoryObject] = []  # evicted while a reader still held a pin
        self._lock = threading.RLock()
        self._stats = TierStats(self.name, capacity_bytes=self.pool.capacity_bytes)
        self.on_evict: list[Callable[[bytes, int], None]] = []
        # called on eviction *before* the bytes return to the pool, with a view that is valid only
        # during the call (under the tier lock): a write-back hook copies it there and then
        self.on_evict_chunk: list[Callable[[bytes, Chunk], None]] = []
        self._closed = False

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> Chunk | None:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                self._stats.misses += 1
                return None
            self.policy.access(key)
            self._stats.hits += 1
            e.obj.pin()
        return Chunk(e.obj.tensor, e.fingerprint, e.num_tokens, e.obj.unpin)

    def put(self, key: bytes, chunk: Chunk) -> bool:
        kv = chunk.kv
        r = self.reserve(key, tuple(kv.shape), kv.dtype, chunk.fingerprint, chunk.num_tokens)
        if isinstance(r, bool):
            return r
        r.obj.tensor.copy_(kv)  # outside the lock: the object is not yet visible to readers
        return self.commit(r)

    def reserve(
        self, key: bytes, shape: tuple[int, ...], dtype: torch.dtype, fingerprint: bytes, num_tokens: int
    ) -> Reservation | bool:
        """Pool space for a chunk, evicting as needed; ``True`` if ``key`` is already stored (an
        access, as a ``put`` of a stored key is), ``False`` if there is no room."""
        if self._closed:
            raise TierClosedError("cpu tier is closed")
        with self._lock:
            if key in self._entries:
                self.policy.access(key)
                return True
            obj = self._allocate(shape, dtype)
            if obj is None:
                self._stats.put_failures += 1
                return False
        return Reservation(key, obj, fingerprint, num_tokens)

    def commit(self, r: Reservation) -> bool:
        """Publish a reserved chunk whose bytes are written; ``False`` if the tier closed meanwhile."""
        with self._lock:
            if self._closed:
                self.pool.release(r.obj)
                return False
            if r.key in self._entries:  # another writer stored the same chunk first
                self.pool.release(r.obj)
                return True
            self._entries[r.key] = _Entry(r.obj, r.fingerprint, r.num_tokens)
            self.policy.insert(r.key, r.obj.nbytes)
            self._stats.puts += 1
        return True

    def abort(self, r: Reservation) -> None:
        """Return an uncommitted reservation's space."""
        self.pool.release(r.obj)

    def pinned(self, key: bytes) -> Chunk | None:
        """The chunk under ``key`` pinned for reading, without counting a hit or touching the policy."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            e.obj.pin()
        return Chunk(e.obj.tensor, e.fingerprint, e.num_tokens, e.obj.unpin)

    def clear(self) -> None:
        """Remove every chunk (readers' pins are honoured: their memory returns when released)."""
        with self._lock:
            for key in list(self._entries):
                self.remove(key)
            self._reap()

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> MemoryObject | None:
        obj = self.pool.allocate(shape, dtype)
        while obj is None:
            victim = self.policy.victim(skip=self._is_pinned)
            if victim is None:
                self._reap()
                obj = self.pool.allocate(shape, dtype)
                if obj is None:
                    log.debug("cpu tier: no room for a %s chunk (all pinned, or too big)", shape)
                break
            self._evict(victim)  # type: ignore[arg-type]
            obj = self.pool.allocate(shape, dtype)
        return obj

    def _is_pinned(self, key: object) -> bool:
        e = self._entries.get(key)  # type: ignore[call-overload]
        return e is not None and e.obj.pinned

    def _evict(self, key: bytes) -> None:
        e = self._entries.pop(key)
        self.policy.remove(key)
        nbytes = e.obj.nbytes
        for hook in self.on_evict_chunk:
            hook(key, Chunk(e.obj.tensor, e.fingerprint, e.num_tokens))
        self.pool.release(e.obj)
        if e.obj.nbytes:  # still pinned by a reader: free later
            self._zombies.append(e.obj)
        self._stats.evictions += 1
        self._stats.evicted_bytes += nbytes
        for cb in self.on_evict:
            cb(key, nbytes)

    def _reap(self) -> None:
        self.pool.reap(self._zombies)
        self._zombies = [z for z in self._zombies if z.nbytes]

    def remove(self, key: bytes) -> bool:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is None:
                return False
            self.policy.remove(key)
            self.pool.release(e.obj)
            if e.obj.nbytes:
                self._zombies.append(e.obj)
            return True

    @property
    def evict_hooks(self) -> list[Callable[[bytes, Chunk], None]]:
        return self.on_evict_chunk

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**vars(self._stats))
            s.chunks = len(self._entries)
            s.bytes_used = self.pool.used_bytes
            return s

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for key in list(self._entries):
                self.remove(key)
