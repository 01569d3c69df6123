"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003), adapted to a byte-capacity tier.

ARC splits the resident keys in two LRU lists: ``T1`` holds keys seen once since they were
stored (recency), ``T2`` keys seen at least twice (frequency). Two ghost lists remember keys
that were recently evicted, without their data: ``B1`` those evicted from ``T1``, ``B2`` those
evicted from ``T2``. A ghost hit says which list was too short, and moves the target size
``p`` of ``T1``: a hit in ``B1`` grows it (recency would have paid), a hit in ``B2`` shrinks it.
A scan of one-time keys only ever churns ``T1``, so a hot set in ``T2`` survives it.

Adaptation for a tier that evicts by bytes. Classic ARC knows its capacity ``c`` in pages
and evicts as part of a miss. Here the tier evicts (by bytes, one ``victim`` at a time) and
the capacity in keys is not known up front. So:

* ``c`` is read as the number of resident keys at the moment of a ghost hit, and ``p`` is
  clamped to ``[0, c]``. KV chunks have a fixed token count, so their sizes are nearly equal
  and a key count tracks bytes well; we do not weight ``p`` by size.
* ``victim`` takes the LRU end of ``T1`` when ``|T1| > p`` and of ``T2`` otherwise (the list
  it prefers falls back to the other when empty or fully skipped). The paper's tie rule
  ("``|T1| == p`` and the missed key is in ``B2``") is dropped: ``victim`` does not know which
  key caused the eviction.
* The tier cannot tell us whether a ``remove`` was an eviction or a delete, so every removed
  resident key becomes a ghost. A deleted key that comes back is then treated as recently
  evicted, which is the right call for content-addressed chunks.
* Ghosts hold no bytes, so they are bounded by count: ``ghost_capacity`` keys across ``B1``
  and ``B2`` (default ``max(64, 2 * resident keys)``, mirroring ARC's ``|B1| + |B2| <= c``
  with slack for a cache whose key count floats). Past the bound, the LRU ghost of the
  longer ghost list goes (``B1`` on a tie).

Invariants: ``T1``, ``T2``, ``B1``, ``B2`` are pairwise disjoint; only ``T1`` and ``T2`` count as
tracked; every list is an ``OrderedDict`` used as an ordered set, least recent first, so
order never depends on hashing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from kvtier.policies.base import Clock, EvictionPolicy, Key, PolicyError

_List = OrderedDict[Key, None]


class ARCPolicy(EvictionPolicy):
    """ARC over opaque keys: recency list, frequency list, two ghost lists, adaptive target."""

    name = "arc"

    def __init__(self, clock: Clock = time.monotonic, ghost_capacity: int | None = None) -> None:
        super().__init__(clock)
        if ghost_capacity is not None and ghost_capacity < 0:
            raise PolicyError(f"ghost_capacity must be >= 0, got {ghost_capacity}")
        self._ghost_capacity = ghost_capacity
        self._t1: _List = OrderedDict()
        self._t2: _List = OrderedDict()
        self._b1: _List = OrderedDict()
        self._b2: _List = OrderedDict()
        self._p = 0.0

    @property
    def target_t1(self) -> float:
        """ARC's ``p``: how many resident keys the recency list ``T1`` should hold."""
        return self._p

    def ghost_limit(self) -> int:
        """The most ghost keys (``|B1| + |B2|``) kept right now."""
        if self._ghost_capacity is not None:
            return self._ghost_capacity
        return max(64, 2 * len(self))

    def insert(self, key: Key, size: int = 1) -> None:
        """Store ``key``: a ghost hit adapts ``p`` and enters ``T2``; a new key enters ``T1``."""
        if key in self._t1 or key in self._t2:
            self.access(key)
        elif key in self._b1:
            # Recency list was too short: grow its target by the ghost-list ratio (at least 1).
            delta = max(1.0, len(self._b2) / len(self._b1))
            del self._b1[key]
            self._t2[key] = None
            self._p = min(self._p + delta, float(len(self)))
        elif key in self._b2:
            # Frequency list was too short: shrink the recency target.
            delta = max(1.0, len(self._b1) / len(self._b2))
            del self._b2[key]
            self._t2[key] = None
            self._p = max(self._p - delta, 0.0)
        else:
            self._t1[key] = None

    def access(self, key: Key) -> None:
        """A hit: ``T1`` keys are promoted to ``T2``, ``T2`` keys become its MRU. Others are ignored."""
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: Key) -> None:
        """Forget a resident key, remembering it as a ghost; a no-op for untracked keys."""
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        elif key in self._t2:
            del self._t2[key]
            self._b2[key] = None
        else:
            return
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        limit = self.ghost_limit()
        while len(self._b1) + len(self._b2) > limit:
            longer = self._b1 if len(self._b1) >= len(self._b2) else self._b2
            longer.popitem(last=False)

    def victim(self, skip: Callable[[Key], bool] | None = None) -> Key | None:
        """LRU key of ``T1`` when ``|T1| > p``, else of ``T2``; skipped keys are passed over."""
        first, second = (self._t1, self._t2) if len(self._t1) > self._p else (self._t2, self._t1)
        for resident in (first, second):
            for key in resident:
                if skip is None or not skip(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2
