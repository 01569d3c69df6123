"""S3-FIFO (Yang et al., SOSP 2023): three FIFO queues and a 2-bit frequency per key.

Most stored objects are "one-hit wonders": never read again. S3-FIFO gives every new key a
short probation in a small FIFO ``S`` (about ``small_ratio`` = 10 % of resident keys). A key
leaves ``S`` from its old end: if it was read while there it moves to the main FIFO ``M``;
otherwise it is evicted and its key is remembered in a ghost FIFO ``G``. A key re-stored
while in ``G`` skips probation and enters ``M``. ``M`` is FIFO with reinsertion (a 2-bit
CLOCK): a key at its old end with frequency > 0 goes back to the new end with frequency - 1.

Why FIFOs and not LRU lists: a hit only bumps a saturating counter (no list move, no lock
in a concurrent cache), and the queues are ``OrderedDict``s so order never depends on hashing.

How this fits the ``victim``/``remove`` contract. In the paper eviction moves keys between
queues until one is dropped. Here ``victim`` does that same internal reordering (promotions
from ``S`` to ``M``, reinsertions in ``M`` with a decremented counter) until the candidate sits
at the old end of its queue with frequency 0, and returns it without removing it; the tier
calls ``remove`` when the data is gone. The candidate is remembered, so calling ``victim``
again before anything changes returns the same key. A skipped (pinned) key found at the
old end of a queue is moved to the new end untouched, like a referenced page in CLOCK: it is
in use, so it earns more time. Keys are never dropped by ``victim``, so tracking is exact.

Details we chose where the paper leaves room:
* frequency is per key and survives the move from ``S`` to ``M``;
* ``S`` is preferred when ``|S| >= small_ratio * resident keys``, as in the paper, with
  fallback to the other queue when the preferred one yields nothing;
* ``remove`` of a key in ``S`` puts it in ``G`` (the tier cannot say eviction from delete);
  ``remove`` of a key in ``M`` does not, as in the paper;
* ``G`` holds at most ``ghost_capacity`` keys (default ``max(64, |M|)``: the paper sizes it
  like ``M``), oldest dropped first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from kvtier.policies.base import Clock, EvictionPolicy, Key, PolicyError

MAX_FREQ: Final = 3
"""2-bit saturating counter."""

_Scan = Callable[[Callable[[Key], bool] | None], tuple[bool, Key | None]]

_NO_KEY: Final = object()
"""Marks "no remembered victim" (``None`` could in principle be a key)."""


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO over opaque keys: small FIFO, main FIFO with reinsertion, ghost FIFO."""

    name = "s3fifo"

    def __init__(
        self,
        clock: Clock = time.monotonic,
        small_ratio: float = 0.1,
        ghost_capacity: int | None = None,
    ) -> None:
        super().__init__(clock)
        if not 0.0 < small_ratio < 1.0:
            raise PolicyError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if ghost_capacity is not None and ghost_capacity < 0:
            raise PolicyError(f"ghost_capacity must be >= 0, got {ghost_capacity}")
        self._small_ratio = small_ratio
        self._ghost_capacity = ghost_capacity
        # Queues are ordered sets, oldest first (the end S3-FIFO evicts from).
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}  # tracked keys exactly
        self._pending: object = _NO_KEY  # the victim last chosen, until something changes

    def insert(self, key: Key, size: int = 1) -> None:
        """Store ``key``: into ``M`` if it is a ghost, else into ``S``; re-inserting is an access."""
        if key in self._freq:
            self.access(key)
            return
        self._pending = _NO_KEY
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0

    def access(self, key: Key) -> None:
        """A hit bumps the saturating counter; no queue moves. Untracked keys are ignored."""
        freq = self._freq.get(key)
        if freq is None:
            return
        self._freq[key] = min(freq + 1, MAX_FREQ)
        if key == self._pending:
            self._pending = _NO_KEY

    def remove(self, key: Key) -> None:
        """Forget ``key``; one leaving ``S`` is remembered in ``G``. A no-op for untracked keys."""
        if self._freq.pop(key, None) is None:
            return
        self._pending = _NO_KEY
        if key in self._small:
            del self._small[key]
            self._ghost[key] = None
            limit = max(64, len(self._main)) if self._ghost_capacity is None else self._ghost_capacity
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)
        else:
            del self._main[key]

    def victim(self, skip: Callable[[Key], bool] | None = None) -> Key | None:
        """The next key S3-FIFO would drop, reordering queues as the algorithm does (see module doc)."""
        pending = self._pending
        if pending is not _NO_KEY and (skip is None or not skip(pending)):
            return pending
        if not self._freq:
            return None
        scans: tuple[_Scan, ...]
        if self._small and len(self._small) >= self._small_ratio * len(self._freq):
            scans = (self._scan_small, self._scan_main)
        else:
            # If M yields nothing, S may promote keys into M, which then needs a second look.
            scans = (self._scan_main, self._scan_small, self._scan_main)
        for scan in scans:
            found, key = scan(skip)
            if found:
                self._pending = key
                return key
        return None

    def _scan_small(self, skip: Callable[[Key], bool] | None) -> tuple[bool, Key | None]:
        """Walk ``S`` from its old end: promote read keys to ``M``, stop at an unread one."""
        skipped_run = 0  # consecutive skipped keys; equal to |S| means all are skipped
        while self._small and skipped_run < len(self._small):
            key = next(iter(self._small))
            if skip is not None and skip(key):
                self._small.move_to_end(key)
                skipped_run += 1
            elif self._freq[key] > 0:
                del self._small[key]
                self._main[key] = None
                skipped_run = 0
            else:
                return True, key
        return False, None

    def _scan_main(self, skip: Callable[[Key], bool] | None) -> tuple[bool, Key | None]:
        """Walk ``M`` from its old end: reinsert keys with frequency > 0 (decremented), stop at 0.

        Terminates: each step either ends the scan, spends one unit of a bounded counter, or
        passes over a skipped key, and ``|M|`` skips in a row mean every key is skipped.
        """
        skipped_run = 0
        while self._main and skipped_run < len(self._main):
            key = next(iter(self._main))
            if skip is not None and skip(key):
                self._main.move_to_end(key)
                skipped_run += 1
            elif self._freq[key] > 0:
                self._freq[key] -= 1
                self._main.move_to_end(key)
                skipped_run = 0
            else:
                return True, key
        return False, None

    def queue_of(self, key: Key) -> str | None:
        """``"small"``, ``"main"`` or ``"ghost"`` (for tests and stats); ``None`` if unknown."""
        for label, queue in (("small", self._small), ("main", self._main), ("ghost", self._ghost)):
            if key in queue:
                return label
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq
