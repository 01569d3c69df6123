"""Per-instance runtime state: in-flight requests and the cool-down after a failure.

Invariants: ``inflight`` counts requests the router is forwarding to the instance right now
(incremented before the connection, decremented in a ``finally``), so it never drifts. An
instance whose connection failed is ``down`` for ``cooldown_s``: policies order it last, so it
is tried only when nothing else is left; the daemon's cool-down is separate (a dead daemon
only loses the prefix signal, the instance still serves). ``lookup_timeouts`` counts the
daemon's lookup timeouts in a row (0 after any answer). The clock is injected for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.router.config import BackendSpec

Clock = Callable[[], float]


@dataclass
class Backend:
    spec: BackendSpec
    clock: Clock = time.monotonic
    inflight: int = 0
    down_until: float = 0.0
    lookup_down_until: float = 0.0
    lookup_timeouts: int = 0
    served: int = 0
    failures: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def is_up(self) -> bool:
        return self.clock() >= self.down_until

    def lookup_up(self) -> bool:
        return bool(self.spec.lookup_url) and self.clock() >= self.lookup_down_until

    def mark_down(self, cooldown_s: float) -> None:
        self.failures += 1
        self.down_until = self.clock() + cooldown_s

    def mark_up(self) -> None:
        self.down_until = 0.0

    def mark_lookup_down(self, cooldown_s: float) -> None:
        self.lookup_timeouts = 0
        self.lookup_down_until = self.clock() + cooldown_s

    def lookup_timed_out(self, strikes: int, cooldown_s: float) -> bool:
        """One more timeout in a row; the ``strikes``-th starts the cool-down (True then)."""
        self.lookup_timeouts += 1
        if self.lookup_timeouts < strikes:
            return False
        self.mark_lookup_down(cooldown_s)
        return True
