"""A circuit breaker for remote tiers: a dead or slow store costs one timeout, not one per request.

States::

    CLOSED --(failure_threshold consecutive failures, or ONE slow failure)--> OPEN
    OPEN   --(backoff elapsed)--> HALF_OPEN   (exactly one caller is let through as a probe)
    HALF_OPEN --(probe succeeds)--> CLOSED     (backoff resets)
    HALF_OPEN --(probe fails)--> OPEN          (backoff doubles, up to backoff_max_s)

While OPEN, ``allow()`` is ``False`` and the tier answers a miss / skips the write at once, so a
request never waits on a store that is known to be down. Each *state change* is logged exactly
once (the first failure at WARNING, recovery at INFO, the in-between probes at DEBUG), so an
outage produces two lines, not one per request.

Why one *slow* failure opens it at once (``failure(exc, slow=True)``: the call ran into its
timeout): a stalled store (a SIGSTOPped server accepts connections and never answers) costs a
full ``timeout_s`` per call, and counting ``failure_threshold`` of them would make one request
wait several timeouts. A fast failure (connection refused) costs milliseconds, so those are
counted up to the threshold to ride over a blip.

Background probing (``probe=`` given): while OPEN no caller ever touches the store; a daemon
thread calls ``probe()`` (a cheap ping bounded by the tier's timeout) once the backoff has
elapsed, and closes the breaker when it answers. So after the breaker opens a request pays
nothing for the outage, and the store is back in use at most ``backoff_max_s × (1 + jitter)``
plus one probe timeout after it recovers. Without ``probe`` the first caller after the backoff is
let through as the probe (the classic in-band half-open).

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

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        jitter: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        on_open: Callable[[], None] | None = None,
        probe: Callable[[], object] | None = None,
    ) -> None:
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
        self._probe = probe
        self._prober: threading.Thread | None = None
        self._stopped = threading.Event()
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
                if self._probe is not None or now < self._retry_at:  # the prober decides
                    self.rejected += 1
                    return False
                self._enter(BreakerState.HALF_OPEN, "probing")
                self._probe_since = now
                return True
            # HALF_OPEN: one probe at a time; forget a probe that never reported.
            if self._probe is not None:
                self.rejected += 1
                return False
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

    def failure(self, exc: BaseException, *, slow: bool = False) -> None:
        """The last allowed call failed (connection error, timeout, protocol error); ``slow``: it
        took about its whole timeout, which opens the breaker at once (see the module docstring)."""
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
            elif self._state is BreakerState.CLOSED and (slow or self._consecutive >= self.failure_threshold):
                why = "a call ran into its timeout" if slow else f"{self._consecutive} consecutive failures"
                self._open(f"{why}, last {what}")
                callback = self._on_open
            elif self._state is BreakerState.CLOSED:
                log.debug(
                    "%s: failure %d/%d (%s)", self.name, self._consecutive, self.failure_threshold, what
                )
        if callback is not None:
            callback()  # outside the lock: it may reset a connection pool (slow)

    def close(self) -> None:
        """Stop the background prober (the tier is closing)."""
        self._stopped.set()

    def _open(self, why: str) -> None:
        delay = self._backoff * (1 + random.uniform(-self.jitter, self.jitter))
        self._retry_at = self._clock() + delay
        self._enter(BreakerState.OPEN, f"{why}; treating as misses, retry in {delay:.2f}s")
        if self._probe is not None and (self._prober is None or not self._prober.is_alive()):
            self._prober = threading.Thread(
                target=self._probe_loop, daemon=True, name=f"kvtier-probe-{self.name}"
            )
            self._prober.start()

    def _probe_loop(self) -> None:
        """Until the store answers (or ``close``): wait out the backoff, then probe once."""
        assert self._probe is not None
        while not self._stopped.is_set():
            with self._lock:
                if self._state is BreakerState.CLOSED:
                    return
                wait = self._retry_at - self._clock()
                if wait <= 0:
                    self._enter(BreakerState.HALF_OPEN, "probing in the background")
            if wait > 0:
                self._stopped.wait(min(wait, 0.25))  # re-read the clock: tests inject one
                continue
            try:
                self._probe()
            except Exception as e:  # any failure of the probe means "still down"; it is recorded
                self.failure(e)
                continue
            self.success()
            return

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
