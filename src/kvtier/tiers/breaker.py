"""A circuit breaker for remote tiers: a dead or slow store costs one timeout, not one per request.

States::

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN   --(backoff elapsed)--> HALF_OPEN   (exactly one caller is let through as a probe)
    HALF_OPEN --(probe succeeds)--> CLOSED     (backoff resets)
    HALF_OPEN --(probe fails)--> OPEN          (backoff doubles, up to backoff_max_s)

While OPEN, ``allow()`` is ``False`` and the tier answers a miss / skips the write at once, so a
request never waits on a store that is known to be down. Each *state change* is logged exactly
once (the first failure at WARNING, recovery at INFO, the in-between probes at DEBUG), so an
outage produces two lines, not one per request.

Invariants:
* The breaker never raises; it only answers ``allow()`` and records outcomes.
* At most one probe is in flight in HALF_OPEN; a probe that never reports (its thread died) is
  forgotten after ``backoff_max_s`` so the breaker cannot wedge shut.
* Jitter (``±jitter`` of the backoff) keeps many engine processes from probing a recovering
  store in lock-step; tests pass ``jitter=0`` and an injected ``clock``.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable

from kvtier.tiers.base import TierError

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Tracks the health of one remote store. Thread-safe."""

    def __init__(self, name: str, *, failure_threshold: int = 3, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, jitter: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 on_open: Callable[[], None] | None = None) -> None:  # fmt: skip
        if failure_threshold < 1:
            raise TierError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise TierError(
                f"need 0 < backoff_initial_s <= backoff_max_s, got {backoff_initial_s}, {backoff_max_s}"
            )
        if not 0 <= jitter < 1:
            raise TierError(f"jitter must be in [0, 1), got {jitter}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.jitter = jitter
        self._clock = clock
        self._on_open = on_open
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._backoff = backoff_initial_s
        self._retry_at = 0.0
        self._probe_since: float | None = None
        self.failures = 0
        """Every recorded failure, in any state (a tier adds it to ``TierStats.errors``)."""
        self.rejected = 0
        """Calls refused while OPEN / while a probe was in flight."""
        self.transitions: list[BreakerState] = []
        """Every state entered, in order (for tests and the stats page)."""

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call to the store may be attempted now."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            now = self._clock()
            if self._state is BreakerState.OPEN:
                if now < self._retry_at:
                    self.rejected += 1
                    return False
                self._enter(BreakerState.HALF_OPEN, "probing")
                self._probe_since = now
                return True
            # HALF_OPEN: one probe at a time; forget a probe that never reported.
            if self._probe_since is not None and now - self._probe_since < self.backoff_max_s:
                self.rejected += 1
                return False
            self._probe_since = now
            return True

    def success(self) -> None:
        """The last allowed call reached the store and it answered."""
        with self._lock:
            self._consecutive = 0
            self._probe_since = None
            if self._state is not BreakerState.CLOSED:
                self._backoff = self.backoff_initial_s
                self._enter(BreakerState.CLOSED, "store answered again; resuming")

    def failure(self, exc: BaseException) -> None:
        """The last allowed call failed (connection error, timeout, protocol error)."""
        callback = None
        with self._lock:
            self.failures += 1
            self._consecutive += 1
            self._probe_since = None
            what = f"{type(exc).__name__}: {exc}"
            if self._state is BreakerState.HALF_OPEN:
                self._backoff = min(self._backoff * 2, self.backoff_max_s)
                self._open(f"probe failed ({what})")
                callback = self._on_open
            elif self._state is BreakerState.CLOSED and self._consecutive >= self.failure_threshold:
                self._open(f"{self._consecutive} consecutive failures, last {what}")
                callback = self._on_open
            elif self._state is BreakerState.CLOSED:
                log.debug("%s: failure %d/%d (%s)", self.name, self._consecutive, self.failure_threshold,
                          what)  # fmt: skip
        if callback is not None:
            callback()  # outside the lock: it may reset a connection pool (slow)

    def _open(self, why: str) -> None:
        delay = self._backoff * (1 + random.uniform(-self.jitter, self.jitter))
        self._retry_at = self._clock() + delay
        self._enter(BreakerState.OPEN, f"{why}; treating as misses, retry in {delay:.2f}s")

    def _enter(self, state: BreakerState, why: str) -> None:
        prev, self._state = self._state, state
        self.transitions.append(state)
        if state is BreakerState.OPEN and prev is BreakerState.CLOSED:
            level = logging.WARNING
        elif state is BreakerState.CLOSED:
            level = logging.INFO
        else:
            level = logging.DEBUG
        log.log(level, "%s: circuit %s -> %s: %s", self.name, prev.value, state.value, why)
