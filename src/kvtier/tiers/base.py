"""The Tier contract: a key -> chunk store with a byte capacity.

Every tier (cpu, disk, redis, s3, remote daemon) implements five methods — ``contains``,
``get``, ``put``, ``remove``, ``close`` — and inherits batched defaults that a tier with a
cheaper bulk path (pipelines, multi-get) overrides. One conformance suite
(tests/tiers/test_conformance.py) runs against every tier.

Invariants:
* Keys are the 16-byte chained digests of ``keys.ChunkKey``; a tier treats them as opaque.
* ``get`` returns the chunk exactly as ``put`` received it (same fingerprint, token count,
  shape, dtype and bytes) or ``None``. A tier that finds corrupt or unreadable data returns
  ``None`` (a miss) and logs; it never raises to the caller for a data problem.
* ``put`` returns ``False`` when it could not store (no space, tier down) — a soft failure,
  never an exception for a runtime condition. Invalid *arguments* raise ``TierError``.
* A ``Chunk`` returned by ``get`` may be a view into tier memory (the CPU tier's pool); the
  caller must call ``release()`` (or use it as a context manager) once it has copied the data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from kvtier.chunk import Chunk
from kvtier.errors import KVTierError, StateError

if TYPE_CHECKING:
    import torch


class TierError(KVTierError, ValueError):
    """A tier was called with invalid arguments (not a runtime failure, which is soft)."""


class TierClosedError(StateError, TierError):
    """A tier (or the TierManager) was used after ``close()``."""


@dataclass
class TierStats:
    """Counters every tier keeps; surfaced by ``CacheEngine.stats()`` and Prometheus."""

    name: str
    chunks: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_failures: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    errors: int = 0
    # filled in by the TierManager, which times every call it makes to a tier
    read_bytes: int = 0
    written_bytes: int = 0
    get_seconds: float = 0.0  # total time in get/batched_get; mean = get_seconds / (hits + misses)
    put_seconds: float = 0.0
    queue_depth: int = 0  # asynchronous writes waiting for this tier
    queue_drops: int = 0  # asynchronous writes dropped because the queue stayed full
    promotions: int = 0  # hits here copied up to the top tier (on get or prefetch)


class Tier(ABC):
    """A store of chunks by key. Thread-safe: the TierManager calls it from worker threads."""

    name: str = "tier"

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether ``get(key)`` would (very likely) hit; cheap, no data transfer."""

    @abstractmethod
    def get(self, key: bytes) -> Chunk | None:
        """The chunk stored under ``key``, or ``None`` (missing, corrupt, tier down)."""

    @abstractmethod
    def put(self, key: bytes, chunk: Chunk) -> bool:
        """Store a copy of ``chunk``; ``False`` if it could not be stored."""

    @abstractmethod
    def remove(self, key: bytes) -> bool:
        """Drop ``key``; ``True`` if it was there."""

    @abstractmethod
    def stats(self) -> TierStats:
        """A snapshot of this tier's counters."""

    def close(self) -> None:  # noqa: B027 - optional hook, most tiers have something to close
        """Release resources; the tier is unusable afterwards."""

    # -- optional abilities: declared here, so callers never probe with ``getattr`` -------------
    def keys(self) -> list[bytes] | None:
        """Every key this tier holds, or ``None`` if it cannot list them cheaply (remote stores)."""
        return None

    def learn_keys(self, keys: Iterable[bytes]) -> bool:
        """Record that ``keys`` are held elsewhere (a key mirror); ``False``: this tier holds data."""
        return False

    def sync(self) -> bool:
        """Make what ``put`` accepted durable; ``True`` when it is (a volatile tier has nothing to do)."""
        return True

    @property
    def evict_hooks(self) -> list[Callable[[bytes, Chunk], None]] | None:
        """Hooks called with ``(key, view)`` just before a chunk is evicted (the view is valid only
        during the call), or ``None`` if this tier never evicts by policy. Write-back needs them."""
        return None

    # -- batched defaults ---------------------------------------------------------------------
    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are present (stops at the first miss)."""
        n = 0
        for k in keys:
            if not self.contains(k):
                break
            n += 1
        return n

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        return [self.get(k) for k in keys]

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        return [self.put(k, c) for k, c in items]

    def batched_get_into(
        self, keys: Sequence[bytes], into: Sequence[torch.Tensor | None]
    ) -> list[Chunk | None]:
        """``batched_get`` with a destination per key: ``into[i]`` is a CPU tensor of key ``i``'s
        expected (stored) shape and dtype — e.g. the caller's output rows — or ``None``. A tier
        that receives or reads bytes may put a hit's straight into ``into[i]`` and return a chunk
        whose ``kv`` *is* ``into[i]`` (the caller's copy then has nothing to do); it may also
        ignore them (this default). On a miss or a failure ``into[i]`` may hold partial data."""
        return self.batched_get(keys)

    def __enter__(self) -> Tier:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
