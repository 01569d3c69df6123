"""A fault-injection wrapper around any tier: latency, errors, hangs, torn/corrupt reads, full store.

Enabled from config alone (``fault.tiers: remote`` or ``cpu,disk,remote`` — any position of the
stack; see README "Fault injection"), or built directly for tests (``FaultTier(inner, spec)``).
It exists so that the chaos suite (tests/chaos) and an operator rehearsing an outage can drive
the real engine, manager and daemon through failures the real stores produce rarely.

Faults, each drawn independently per call from a seeded RNG (reproducible runs):

* ``latency_s``: every call sleeps this long first (a slow network or disk).
* ``error_rate``: the call raises ``ConnectionError`` (a store that drops connections).
* ``hang_rate`` / ``hang_s``: the call sleeps ``hang_s`` then raises ``TimeoutError`` (a stalled
  store whose client gives up at its timeout; set ``hang_s`` to the tier's ``timeout_s``).
* ``corrupt_rate`` / ``torn_rate`` (reads): the chunk is encoded with the real ``serde`` format,
  one payload byte is flipped (corrupt) or the blob is cut short (torn), and the damaged blob
  goes through the real decoder, exactly as a tier reading a damaged value would. The decoder's
  checks turn it into a miss; if they ever let it through, the damaged KV is returned — so a
  chaos run that sees 0 wrong KV proves the checks, it does not assume them.
* ``full_rate`` (writes): ``put`` raises ``OSError(ENOSPC)`` (disk full / store out of memory).

Invariants: the wrapper never changes what a successful call returns; it only adds delay or turns
a call into one of the failures above. Errors are raised (not swallowed) so that the layer
above — ``TierManager``, whose contract is "a failing tier is a miss" — is what gets tested.
``injected`` counts every fault by kind.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvtier import serde
from kvtier.chunk import Chunk
from kvtier.errors import KVTierError
from kvtier.tiers.base import Tier, TierError, TierStats

_T = TypeVar("_T")


class InjectedConnectionError(KVTierError, ConnectionError):
    """An injected dropped connection (an ``OSError``: the tier manager's soft-failure kind)."""


class InjectedTimeout(KVTierError, TimeoutError):
    """An injected call that got no answer within ``hang_s``."""


class InjectedDiskFull(KVTierError, OSError):
    """An injected ``ENOSPC`` on a write."""


@dataclass(frozen=True)
class FaultSpec:
    """What to inject; rates are probabilities per call in [0, 1]."""

    latency_s: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 0.5
    corrupt_rate: float = 0.0
    torn_rate: float = 0.0
    full_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "hang_rate", "corrupt_rate", "torn_rate", "full_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise TierError(f"fault.{name} must be in [0, 1], got {v}")
        if self.latency_s < 0 or self.hang_s < 0:
            raise TierError(
                f"fault.latency_s and fault.hang_s must be >= 0, got {self.latency_s}, {self.hang_s}"
            )


class FaultTier(Tier):
    """``inner`` with the faults of ``spec`` injected; forwards everything else unchanged."""

    def __init__(self, inner: Tier, spec: FaultSpec, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner = inner
        self.spec = spec
        self.name = inner.name  # stats and logs keep the real tier's name
        self.capacity_enforced = getattr(inner, "capacity_enforced", True)
        self._rng = random.Random(spec.seed)
        self._rng_lock = threading.Lock()
        self._sleep = sleep
        self.injected: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def __getattr__(self, attr: str) -> object:  # breaker, clear(), url ...: the inner tier's
        return getattr(self.inner, attr)

    # -- the dice -------------------------------------------------------------------------------
    def _roll(self, rate: float) -> bool:
        if rate <= 0.0:
            return False
        with self._rng_lock:
            return self._rng.random() < rate

    def _hit(self, kind: str) -> None:
        with self._count_lock:
            self.injected[kind] += 1

    def _call(self, fn: Callable[[], _T], *, write: bool = False) -> _T:
        s = self.spec
        if s.latency_s:
            self._sleep(s.latency_s)
        if self._roll(s.error_rate):
            self._hit("error")
            raise InjectedConnectionError("injected fault: connection dropped")
        if self._roll(s.hang_rate):
            self._hit("hang")
            self._sleep(s.hang_s)
            raise InjectedTimeout(f"injected fault: no answer within {s.hang_s}s")
        if write and self._roll(s.full_rate):
            self._hit("full")
            raise InjectedDiskFull(errno.ENOSPC, "injected fault: no space left")
        return fn()

    def _damage(self, key: bytes, c: Chunk | None) -> Chunk | None:
        """Maybe pass ``c`` through a corrupt or torn encoding and the real decoder."""
        if c is None:
            return None
        kind = (
            "corrupt"
            if self._roll(self.spec.corrupt_rate)
            else "torn"
            if self._roll(self.spec.torn_rate)
            else ""
        )
        if not kind:
            return c
        self._hit(kind)
        blob = bytearray(serde.encode(c, "raw", key))
        c.release()
        with self._rng_lock:
            at = self._rng.randrange(serde.HEADER_BYTES, len(blob)) if len(blob) > serde.HEADER_BYTES else 0
        if kind == "corrupt":
            blob[at] ^= 0x40
        else:
            del blob[at:]
        try:
            return serde.decode(blob, expect_key=key)  # NOTE: only if the checks missed the damage
        except serde.CorruptChunkError:
            self._hit(f"{kind}_detected")
            return None

    # -- the Tier API ---------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return self._call(lambda: self.inner.contains(key))

    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        return self._call(lambda: self.inner.prefix_contains(keys))

    def get(self, key: bytes) -> Chunk | None:
        return self._damage(key, self._call(lambda: self.inner.get(key)))

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        got = self._call(lambda: self.inner.batched_get(keys))
        return [self._damage(k, c) for k, c in zip(keys, got)]

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self._call(lambda: self.inner.put(key, chunk), write=True)

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        items = list(items)
        return self._call(lambda: self.inner.batched_put(items), write=True)

    def remove(self, key: bytes) -> bool:
        return self.inner.remove(key)  # NOTE: never faulted: a remove that "fails" proves nothing

    def stats(self) -> TierStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()

    def keys(self) -> list[bytes] | None:
        return self.inner.keys()

    def learn_keys(self, keys: Iterable[bytes]) -> bool:
        return self.inner.learn_keys(keys)

    def sync(self) -> bool:
        return self.inner.sync()

    @property
    def evict_hooks(self) -> list[Callable[[bytes, Chunk], None]] | None:
        return self.inner.evict_hooks
