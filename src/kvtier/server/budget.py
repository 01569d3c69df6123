"""The daemon-wide bound on frame payload bytes in flight (received, not yet handled).

Each connection reads one frame at a time, so a connection holds at most one payload of at most
the negotiated ``max_payload_bytes``; this budget bounds the sum over all connections. A frame
is admitted whole: its payload's full size is taken before its first byte is read, and given
back once the daemon has handled it (or the connection died). Admitting whole frames means no
two half-received payloads can each wait for the other's bytes (no deadlock); a frame that does
not fit waits its turn (FIFO) with its connection's reading paused, which is backpressure on
that client only. A client that stalls mid-payload keeps its share until its slow-sender
timeout aborts it.

Loop thread only (every caller is an asyncio callback of the daemon's loop): no lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kvtier.errors import KVTierError


class BudgetError(KVTierError, ValueError):
    """A payload budget of no bytes, or a payload larger than the whole budget."""


class PayloadBudget:
    """At most ``max_bytes`` of payloads admitted at once."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise BudgetError(f"payload budget must be >= 1 byte, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self.waits = 0
        """Frames that had to wait for room (a counter for ``/stats``)."""
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()

    def admit(self, n: int, on_admit: Callable[[], None]) -> bool:
        """Take ``n`` bytes now (``True``) or queue ``on_admit`` to run once they are taken."""
        if n > self.max_bytes:
            raise BudgetError(f"a {n}-byte payload can never fit the {self.max_bytes}-byte budget")
        if not self._waiters and self.used + n <= self.max_bytes:
            self._take(n)
            return True
        self.waits += 1
        self._waiters.append((n, on_admit))
        return False

    def cancel(self, on_admit: Callable[[], None]) -> None:
        """Forget a queued ``admit`` (its connection closed while it waited)."""
        self._waiters = deque(w for w in self._waiters if w[1] is not on_admit)
        self._wake()

    def give(self, n: int) -> None:
        """Return ``n`` admitted bytes and admit waiters, in order, while they fit."""
        self.used -= n
        assert self.used >= 0, "payload budget given back more than it lent"
        self._wake()

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.max_bytes:
            n, cb = self._waiters.popleft()
            self._take(n)
            cb()
