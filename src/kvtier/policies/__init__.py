"""Eviction policies: pure, deterministic bookkeeping over the keys a tier holds.

Pick one by name with ``make_policy``; the registry is an explicit dict (not class-name
lookup), so the valid names are listed in one place and in every error message.
"""

from __future__ import annotations

import time

from kvtier.policies.arc import ARCPolicy
from kvtier.policies.base import Clock, EvictionPolicy, Key, PolicyError
from kvtier.policies.lfu import LFUPolicy
from kvtier.policies.lru import LRUPolicy
from kvtier.policies.s3fifo import S3FIFOPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
}


def make_policy(name: str, clock: Clock = time.monotonic) -> EvictionPolicy:
    """A new policy of the given name; ``ValueError`` naming the valid choices otherwise."""
    try:
        cls = POLICIES[name]
    except KeyError:
        valid = ", ".join(sorted(POLICIES))
        raise PolicyError(f"unknown eviction policy {name!r}; valid choices: {valid}") from None
    return cls(clock=clock)


__all__ = [
    "POLICIES",
    "ARCPolicy",
    "Clock",
    "EvictionPolicy",
    "Key",
    "LFUPolicy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "make_policy",
]
