"""The eviction-policy contract: pure bookkeeping over opaque keys.

A policy never owns data and never imports torch. The tier tells it what happened
(``insert``, ``access``, ``remove``) and asks it which key to drop next (``victim``).
The clock is injected (``clock`` returns seconds as a float) so tests are deterministic.

Invariants every policy keeps (checked by tests/policies/test_policy_conformance.py):
* ``victim()`` returns a key that is currently tracked, or ``None`` when nothing is tracked
  or every tracked key is excluded by ``skip``; it does not remove the key — the tier calls
  ``remove`` once the data is gone.
* ``insert`` of a tracked key counts as an access; ``remove`` of an untracked key is a no-op.
* ``len(policy)`` equals the number of tracked keys; ``key in policy`` tests tracking.
* Same sequence of calls and clock readings => same victims (no randomness, no hash order).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable

from kvtier.errors import KVTierError

Clock = Callable[[], float]
Key = Hashable


class PolicyError(KVTierError, ValueError):
    """An unknown eviction policy name or a bad policy parameter."""


class EvictionPolicy(ABC):
    """Decides the eviction order of the keys a tier holds."""

    name: str = "base"

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock

    @abstractmethod
    def insert(self, key: Key, size: int = 1) -> None:
        """A key was stored (``size`` in bytes, for size-aware policies)."""

    @abstractmethod
    def access(self, key: Key) -> None:
        """A tracked key was read (a hit)."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """A key's data is gone (evicted or deleted); forget it."""

    @abstractmethod
    def victim(self, skip: Callable[[Key], bool] | None = None) -> Key | None:
        """The key to evict next, passing over keys for which ``skip(key)`` is true (e.g. pinned)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...
