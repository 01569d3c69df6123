"""Least-frequently-used eviction in O(1) per operation.

Why frequency buckets in a linked list rather than a heap: a heap costs O(log n) per access
and needs a tie-break stamp on every entry. Here each distinct frequency owns one bucket;
buckets form a doubly linked list sorted by frequency, lowest first. An access moves a key
from bucket ``f`` to bucket ``f + 1``, which is either the next bucket or a new one linked
right after ``f``, so no search is ever needed. The victim is the oldest key of the first
bucket.

Why an ``OrderedDict`` per bucket: a key enters a bucket at the moment of its latest access,
so insertion order within a bucket is recency order. Taking the first key of the lowest
bucket therefore breaks frequency ties by least recent use, and never by hash order.

Invariants:
* every tracked key is in exactly one bucket, the one whose ``freq`` is its access count
  (the insert counts as 1);
* buckets are never empty and are strictly increasing in ``freq`` from ``_head`` onwards.

Frequencies are not aged: a key that was hot long ago keeps its count. Tiers that see
shifting working sets should prefer ARC or S3-FIFO, which adapt.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from kvtier.policies.base import Clock, EvictionPolicy, Key


class _Bucket:
    """All keys accessed exactly ``freq`` times, least recently used first."""

    __slots__ = ("freq", "keys", "next", "prev")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys: OrderedDict[Key, None] = OrderedDict()
        self.prev: _Bucket | None = None
        self.next: _Bucket | None = None


class LFUPolicy(EvictionPolicy):
    """Evicts the least frequently accessed key; ties go to the least recently used one."""

    name = "lfu"

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._head: _Bucket | None = None  # lowest frequency
        self._where: dict[Key, _Bucket] = {}

    # -- linked-list plumbing -------------------------------------------------------------

    def _link_after(self, new: _Bucket, prev: _Bucket | None) -> None:
        """Link ``new`` after ``prev`` (``None``: at the head)."""
        nxt = self._head if prev is None else prev.next
        new.prev, new.next = prev, nxt
        if nxt is not None:
            nxt.prev = new
        if prev is None:
            self._head = new
        else:
            prev.next = new

    def _unlink_if_empty(self, bucket: _Bucket) -> None:
        if bucket.keys:
            return
        if bucket.prev is None:
            self._head = bucket.next
        else:
            bucket.prev.next = bucket.next
        if bucket.next is not None:
            bucket.next.prev = bucket.prev

    # -- the policy -----------------------------------------------------------------------

    def insert(self, key: Key, size: int = 1) -> None:
        """Track ``key`` with frequency 1; re-inserting a tracked key is an access."""
        if key in self._where:
            self.access(key)
            return
        head = self._head
        if head is None or head.freq != 1:
            head = _Bucket(1)
            self._link_after(head, None)
        head.keys[key] = None
        self._where[key] = head

    def access(self, key: Key) -> None:
        """Move ``key`` to the next frequency; untracked keys are ignored."""
        bucket = self._where.get(key)
        if bucket is None:
            return
        target = bucket.next
        if target is None or target.freq != bucket.freq + 1:
            target = _Bucket(bucket.freq + 1)
            self._link_after(target, bucket)
        del bucket.keys[key]
        target.keys[key] = None
        self._where[key] = target
        self._unlink_if_empty(bucket)

    def remove(self, key: Key) -> None:
        """Forget ``key`` and its count; a no-op when it is not tracked."""
        bucket = self._where.pop(key, None)
        if bucket is None:
            return
        del bucket.keys[key]
        self._unlink_if_empty(bucket)

    def victim(self, skip: Callable[[Key], bool] | None = None) -> Key | None:
        """The oldest key of the lowest-frequency bucket, passing over skipped keys."""
        bucket = self._head
        while bucket is not None:
            for key in bucket.keys:
                if skip is None or not skip(key):
                    return key
            bucket = bucket.next
        return None

    def frequency(self, key: Key) -> int:
        """How many times ``key`` was inserted or accessed since it was last inserted; 0 if untracked."""
        bucket = self._where.get(key)
        return 0 if bucket is None else bucket.freq

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where
