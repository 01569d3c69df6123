"""Where a socket ``Put``'s payload lands: straight in reserved pool space, not in a buffer.

Without a sink the connection receives a ``Put``'s payload into a buffer (budgeted), and the
handler then copies each chunk into pool space it reserves: two passes over every byte, the
second a 32 MiB memcpy per chunk on the daemon's critical path. With one, the service
reserves the chunks' pool space when the ``Put``'s header arrives (before any payload byte is
read), the connection receives each chunk's bytes into its own reservation, and the handler
only commits. The payload budget is not taken: the bytes land in pool space that exists
already (the shared segment), which reserving cannot grow.

Invariants:
* A sink is offered only for a ``Put`` whose items are valid and tile the payload exactly, in
  order (each item's ``payload_offset`` is where the previous one ended, the last ends at the
  payload's end), and only if every item got a reservation; anything else (an invalid item,
  a key already stored, a full pool) takes the ordinary buffered path, whose handler gives
  the answers and errors it always gave.
* Nothing reserved is ever published unless its bytes all arrived: a frame cut short (the
  client died, stalled past the body timeout, or broke the framing) is never handed to the
  handler, and ``release`` returns every reservation the handler did not commit. The
  connection calls ``release`` when the frame is dropped unhandled; the daemon when it is
  done with a handled frame (``Conn.done_with``): exactly once either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvtier.server.pool_tier import Reservation


class PutSink:
    """The reserved destinations of one ``Put``'s chunks, in payload order.

    ``views[i]`` is the writable byte view of ``reservations[i]``'s pool space; ``abort`` is
    the tier's way to return an uncommitted reservation."""

    def __init__(
        self,
        reservations: Sequence[Reservation],
        views: list[memoryview],
        abort: Callable[[Reservation], None],
    ) -> None:
        self.reservations = list(reservations)
        self.views = views
        self.nbytes = sum(v.nbytes for v in views)
        self._abort = abort
        self._open = [True] * len(self.reservations)

    def take(self, i: int) -> Reservation:
        """Reservation ``i``, now the caller's to commit (``release`` no longer returns it)."""
        self._open[i] = False
        return self.reservations[i]

    def release(self) -> None:
        """Return every reservation not taken (idempotent); the views are dead after it."""
        for i, r in enumerate(self.reservations):
            if self._open[i]:
                self._open[i] = False
                self._abort(r)
        self.views = []
