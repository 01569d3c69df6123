"""Least-recently-used eviction.

Why an ``OrderedDict``: it is a hash map threaded by a doubly linked list, so "mark as most
recent" (``move_to_end``), "forget" (``pop``) and "oldest first" (iteration from the front)
are all O(1) per key, and its order is insertion/move order, never hash order, which keeps
victims identical across processes whatever ``PYTHONHASHSEED`` is.

Invariant: the dict's order is recency order, least recent first; every tracked key appears
exactly once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from kvtier.policies.base import Clock, EvictionPolicy, Key


class LRUPolicy(EvictionPolicy):
    """Evicts the key whose last insert or access is the oldest."""

    name = "lru"

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        # Values are unused; the dict is an ordered set, least recent first.
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, size: int = 1) -> None:
        """Track ``key`` as most recent; re-inserting a tracked key is an access."""
        if key in self._order:
            self._order.move_to_end(key)
        else:
            self._order[key] = None

    def access(self, key: Key) -> None:
        """Mark ``key`` as most recent; untracked keys are ignored (a miss is not a hit)."""
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        """Forget ``key``; a no-op when it is not tracked."""
        self._order.pop(key, None)

    def victim(self, skip: Callable[[Key], bool] | None = None) -> Key | None:
        """The least recent key not excluded by ``skip``.

        Costs O(1 + number of skipped keys in front of it): pinned keys are rare and short-lived.
        """
        for key in self._order:
            if skip is None or not skip(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
