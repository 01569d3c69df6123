"""What the scheduler knows of chunks held in worker processes it cannot read.

With vLLM's multiprocess executor (its default) the worker connector and its CacheEngine live in
another process than the scheduler. The scheduler still has to answer "how many tokens can kvtier
supply" without moving data, so the workers report the keys they store (and, once at start, the
keys their persistent tiers already hold) through vLLM's worker->scheduler connector metadata,
and the scheduler keeps them in a ``MirrorTier``: a tier that knows keys and holds no data.

The mirror may be stale: a worker can evict a chunk the mirror still lists. Then the load fails,
the worker reports the blocks, and vLLM recomputes them: slower, never wrong. The mirror is an
LRU bounded to ``max_keys`` (about what the workers' tiers can hold), touched on every hit, so it
forgets roughly what an LRU tier evicts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from kvtier.chunk import Chunk
from kvtier.tiers.base import Tier, TierError, TierStats


class MirrorTier(Tier):
    """Keys only: ``contains`` answers from the mirror, ``get`` always misses, ``put`` stores nothing."""

    name = "worker-mirror"

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise TierError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    def add(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for k in keys:
                self._keys[k] = None
                self._keys.move_to_end(k)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
                self._evictions += 1

    def learn_keys(self, keys: Iterable[bytes]) -> bool:
        self.add(keys)
        return True

    def contains(self, key: bytes) -> bool:
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                self._hits += 1
                return True
            self._misses += 1
            return False

    def get(self, key: bytes) -> Chunk | None:
        return None

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return False

    def remove(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._keys:
                return False
            del self._keys[key]
            return True

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                self.name,
                chunks=len(self._keys),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

    def __len__(self) -> int:
        return len(self._keys)
