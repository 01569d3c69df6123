"""TierManager: makes an ordered list of tiers (fastest first) act as one store.

This is the synchronous base: ``prefix_lookup`` finds the longest run of leading keys present
in the union of the tiers, ``get`` asks tiers top-down, ``put`` writes to every tier.

Invariants:
* A failing tier is a miss, never an error to the caller: exceptions a tier raises at run time
  (``OSError``, ``ConnectionError``, ``TimeoutError``) are counted and logged, and the next tier
  is asked.
* ``prefix_lookup`` never reports a key as present unless some tier's ``contains`` said so, and
  stops at the first key no tier has (a hole ends the prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvtier.tiers.base import Chunk, Tier, TierStats

log = logging.getLogger(__name__)

SOFT_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)
"""Run-time failures of a tier that degrade to a miss (``ConnectionError``/``TimeoutError`` are
``OSError`` subclasses; listed for the reader)."""


class TierManager:
    """Ordered tiers, top (fastest) first."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        if not tiers:
            raise ValueError("TierManager needs at least one tier")
        self.tiers = list(tiers)
        self.errors = 0

    def prefix_lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` present in some tier.

        Chunks of one prefix may be spread over tiers (early ones promoted to CPU, later ones
        only on disk), so each round asks the tiers top-down for the longest run from the
        current position and restarts from the top after any progress.
        """
        n = 0
        keys = list(keys)
        progress = True
        while progress and n < len(keys):
            progress = False
            for tier in self.tiers:
                try:
                    found = tier.prefix_contains(keys[n:])
                except SOFT_ERRORS as e:
                    self._soft_fail(tier, "lookup", e)
                    continue
                if found:
                    n += found
                    progress = True
                    break
        return n

    def _contains(self, tier: Tier, key: bytes) -> bool:
        try:
            return tier.contains(key)
        except SOFT_ERRORS as e:
            self._soft_fail(tier, "contains", e)
            return False

    def get(self, key: bytes) -> Chunk | None:
        """The chunk from the fastest tier that has it, or ``None``."""
        for tier in self.tiers:
            try:
                c = tier.get(key)
            except SOFT_ERRORS as e:
                self._soft_fail(tier, "get", e)
                continue
            if c is not None:
                return c
        return None

    def put(self, key: bytes, chunk: Chunk) -> bool:
        """Write to every tier; ``True`` if at least one stored it."""
        ok = False
        for tier in self.tiers:
            try:
                ok = tier.put(key, chunk) or ok
            except SOFT_ERRORS as e:
                self._soft_fail(tier, "put", e)
        return ok

    def remove(self, key: bytes) -> bool:
        removed = False
        for tier in self.tiers:
            try:
                removed = tier.remove(key) or removed
            except SOFT_ERRORS as e:
                self._soft_fail(tier, "remove", e)
        return removed

    def stats(self) -> dict[str, TierStats]:
        return {t.name: t.stats() for t in self.tiers}

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait for pending asynchronous writes (none in the synchronous manager)."""

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def _soft_fail(self, tier: Tier, op: str, e: BaseException) -> None:
        self.errors += 1
        log.warning("tier %s failed on %s (%s: %s); treated as a miss", tier.name, op, type(e).__name__, e)
