"""One client connection of the daemon: an ``asyncio.BufferedProtocol`` that parses frames.

Why a buffered protocol rather than streams or ``sock_recv_into``: a ``StreamReader`` copies
every payload byte three times (``recv`` into a new ``bytes``, into its buffer, out again), and
``loop.sock_recv_into`` re-registers the socket with epoll for every read. Here the transport
reads straight into memory we hand it (``get_buffer``): prefixes and headers into one small
reusable buffer, a payload directly into its final buffer — one copy, the kernel's —
while the socket stays registered.

Flow control: after each complete frame the transport is paused until the daemon takes the
frame (requests are handled one at a time per connection), so a client cannot queue unbounded
work. A frame whose prefix breaks the limits poisons the connection (``ProtocolError``); a frame
whose body does not arrive within its time limit aborts it (``TimeoutError``).

Memory bounds (no client input makes the daemon allocate more than these):
* a payload is at most the negotiated ``max_payload``, and the daemon-wide ``PayloadBudget``
  bounds all connections' payloads together: a frame is admitted whole before its body is
  read, or waits with this connection's reading paused;
* a large payload is an anonymous ``mmap``: address space the kernel backs page by page as
  bytes land, so a client that announces 1 GiB and sends 30 bytes costs one page, not a
  zero-filled gigabyte (``bytearray(n)`` writes all ``n`` bytes at once);
* a slow sender is aborted once the frame is older than ``body_timeout_s`` plus its size at
  ``MIN_RATE_BYTES_S``, and gives its budget back;
* ``dispose()`` (the daemon calls it when the connection's task ends) drops every buffer and
  breaks the references between this object, its task and its stored exception (whose
  traceback holds the frames that hold this object): a closed connection's memory returns at
  once, not at the next full garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from kvtier.server.budget import PayloadBudget
from kvtier.server.sink import PutSink
from kvtier.wire import protocol as P

SMALL_BUFFER = 256 << 10
LAZY_PAYLOAD_BYTES = 1 << 20
"""Payloads from this size up are anonymous mmaps (backed as bytes arrive), smaller ones bytearrays."""
DIRECT_SEND_BYTES = 256 << 10
"""Payloads from this size up are written with ``os.writev`` straight from their buffers: a
3.11 transport copies whatever the kernel did not take at once into its own growing bytearray
(for a 32 MiB chunk nearly all of it: fresh memory, page faults and a copy)."""
IOV_MAX = 1024
RCVLOWAT_BYTES = 1 << 20
"""While a payload arrives the socket wakes the loop only once this much (or the rest of the
payload) is queued (``SO_RCVLOWAT``): fewer, larger reads. Loopback delivers a 128 MiB store in
~350 KB pieces otherwise, each an event-loop turn (``epoll_wait``, the transport's and our
callbacks): 5-12 ms of a 30-60 ms transfer. The kernel still wakes the reader when its receive
window is nearly full, so a small rcvbuf cannot deadlock; the body timer bounds a stalled
sender as before. 0 switches it off."""
MIN_RATE_BYTES_S = 50e6
"""Slowest accepted sender, beyond ``body_timeout_s`` (NOTE: well under a 1 Gbit/s link)."""

Payload = bytearray | mmap.mmap
"""A frame's payload as the daemon's handlers see it (both are writable buffers)."""

Sink = Callable[[P.Message, int], PutSink | None]
"""Offered each header with a payload (and its size) before any payload byte is read: a
``PutSink`` to receive the payload straight into reserved pool space, or ``None`` for the
buffered path (see ``server/sink.py``)."""

WARM_PAYLOAD_BYTES = 64 << 20
"""Handled payload mmaps kept for reuse, daemon-wide, at most this many bytes together. A fresh
mmap costs a page fault per 4 KiB as bytes land (on a VM more than the copy into the pool);
KV chunks of one model all have one size, so a recycled one fits the next frame. Reuse only
once the daemon is done with it (``done_with``); at most these bytes stay resident beyond the
budget's in-flight bound."""


class _WarmPayloads:
    """Recycled payload mmaps by exact size (loop thread only, like the budget)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._held = 0

    def take(self, n: int) -> mmap.mmap:
        free = self._free.get(n)
        if free:
            self._held -= n
            return free.pop()
        return mmap.mmap(-1, n)

    def give(self, m: mmap.mmap) -> None:
        n = len(m)
        if self._held + n > self.max_bytes:
            m.close()
            return
        self._free.setdefault(n, []).append(m)
        self._held += n


_WARM = _WarmPayloads(WARM_PAYLOAD_BYTES)


class Conn(asyncio.BufferedProtocol):
    def __init__(
        self,
        handler: Callable[[Conn], Coroutine[Any, Any, None]],
        *,
        body_timeout_s: float = 60.0,
        budget: PayloadBudget | None = None,
    ) -> None:
        self._handler: Callable[[Conn], Coroutine[Any, Any, None]] | None = handler
        self.body_timeout_s = body_timeout_s
        self._budget = budget
        self.max_header = P.MAX_HELLO_BYTES
        self.max_payload = 0
        """Limits for the next frame; the daemon raises them after the handshake."""
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(SMALL_BUFFER)
        self._start = self._end = 0
        self._msg: P.Message | None = None  # header decoded, payload pending
        self._plen = 0
        self._payload: Payload | None = None
        self._got = 0
        self._admitting = False  # waiting for the budget to admit the pending payload
        self._partial_held = 0  # budget taken for the payload being received
        self._frames: deque[tuple[P.Message, Payload | PutSink | None]] = deque()
        self.sink: Sink | None = None
        """Set by the daemon after the handshake (``CacheService.sink_put``)."""
        self._sink: PutSink | None = None  # the payload being received into a sink
        self._sink_i = self._sink_off = 0  # the view being filled, and how far
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fd = -1  # a dup of the socket's fd, for direct payload writes (``send``): the loop
        # refuses add_writer on an fd a transport owns; the dup is the same socket
        self._writable: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._sock: Any = None  # the transport's socket, for SO_RCVLOWAT
        self._lowat = 1
        self._sink_done = 0  # payload bytes received into the sink so far

    # -- protocol callbacks -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # pause_writing whenever anything is left unsent, resume when all is sent: ``send`` then
        # returns only once the kernel has every byte (3.12+ transports keep views, not copies)
        transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._fd = os.dup(sock.fileno())
            self._sock = sock
        assert self._handler is not None
        self.task = self._loop.create_task(self._handler(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink.views[self._sink_i][self._sink_off :]
        if self._payload is not None:
            return memoryview(self._payload)[self._got :]
        if self._end == len(self._buf):  # compact, or grow for a large header
            live = self._buf[self._start : self._end]
            size = max(SMALL_BUFFER, len(live) * 2)
            self._buf = live + bytearray(size - len(live))
            self._start, self._end = 0, len(live)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is not None:
            self._sink_advance(nbytes)
        elif self._payload is not None:
            self._got += nbytes
        else:
            self._end += nbytes
        try:
            self._parse()
        except P.ProtocolError as e:
            self._fail(e)
        self._set_lowat()

    def _set_lowat(self) -> None:
        """``SO_RCVLOWAT`` for what is left of the payload being received (1 between payloads)."""
        if self._sink is not None:
            left = self._plen - self._sink_done
        elif self._payload is not None:
            left = len(self._payload) - self._got
        else:
            left = 1
        want = max(1, min(RCVLOWAT_BYTES, left))
        if want != self._lowat and self._sock is not None and RCVLOWAT_BYTES > 0:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            except OSError:  # a transport without it: reads stay as they were
                self._sock = None
                return
            self._lowat = want

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or asyncio.IncompleteReadError(b"", None))
        self._drop_unhandled()
        self._close_fd()
        for fut in (self._drain, self._writable):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- parsing ----------------------------------------------------------------------------------
    def _parse(self) -> None:
        """Turn buffered bytes into frames; pauses reading once a frame is ready."""
        while not self._frames and self._error is None and not self._admitting:
            if self._sink is not None:
                if self._sink_i < len(self._sink.views):
                    return
                assert self._msg is not None
                self._complete(self._msg, self._sink)
                continue
            if self._payload is not None:
                if self._got < len(self._payload):
                    return
                assert self._msg is not None
                self._complete(self._msg, self._payload)
                continue
            avail = self._end - self._start
            if avail < P.PREFIX.size:
                return
            hlen, plen = P.parse_prefix(
                bytes(self._buf[self._start : self._start + P.PREFIX.size]),
                max_header=self.max_header,
                max_payload=self.max_payload,
            )
            if self._timer is None:
                self._start_timer(plen)
            if avail < P.PREFIX.size + hlen:
                return
            h0 = self._start + P.PREFIX.size
            msg = P.decode_header(bytes(self._buf[h0 : h0 + hlen]))
            self._start = h0 + hlen
            if plen == 0:
                self._complete(msg, None)
                continue
            self._msg, self._plen = msg, plen
            sink = self.sink(msg, plen) if self.sink is not None else None
            if sink is not None:
                self._begin_sink(sink)
                continue
            if self._budget is not None and not self._budget.admit(plen, self._admitted):
                self._admitting = True  # NOTE: not the sender's fault: no slow-sender clock meanwhile
                self._cancel_timer()
                break
            self._begin_payload()
        if (self._frames or self._admitting) and self.transport is not None:
            self.transport.pause_reading()

    def _begin_payload(self) -> None:
        """Allocate the admitted payload and move in the bytes that came with the header."""
        plen = self._plen
        self._partial_held = plen if self._budget is not None else 0
        self._payload = _WARM.take(plen) if plen >= LAZY_PAYLOAD_BYTES else bytearray(plen)
        take = min(plen, self._end - self._start)
        self._payload[:take] = self._buf[self._start : self._start + take]
        self._start += take
        self._got = take

    def _begin_sink(self, sink: PutSink) -> None:
        """Receive the pending payload into ``sink`` (its views sum to ``_plen``), starting with
        the bytes that came with the header."""
        if sink.nbytes != self._plen:
            sink.release()
            raise P.ProtocolError(f"a sink of {sink.nbytes} bytes for a {self._plen}-byte payload")
        self._sink, self._sink_i, self._sink_off, self._sink_done = sink, 0, 0, 0
        while self._start < self._end and self._sink_i < len(sink.views):
            view = sink.views[self._sink_i][self._sink_off :]
            take = min(view.nbytes, self._end - self._start)
            view[:take] = self._buf[self._start : self._start + take]
            self._start += take
            self._sink_advance(take)

    def _sink_advance(self, nbytes: int) -> None:
        assert self._sink is not None
        self._sink_off += nbytes
        self._sink_done += nbytes
        views = self._sink.views
        while self._sink_i < len(views) and self._sink_off >= views[self._sink_i].nbytes:
            self._sink_off -= views[self._sink_i].nbytes
            self._sink_i += 1

    def _admitted(self) -> None:
        """The budget took ``_plen`` bytes for this connection (called by ``PayloadBudget``)."""
        self._admitting = False
        if self._error is not None:  # closed while it waited
            assert self._budget is not None
            self._budget.give(self._plen)
            return
        self._begin_payload()
        self._start_timer(self._plen)
        self._loop.call_soon(self._continue)

    def _continue(self) -> None:
        try:
            self._parse()
        except P.ProtocolError as e:
            self._fail(e)
        if not self._frames and not self._admitting and self.transport is not None and self._error is None:
            self.transport.resume_reading()

    def _start_timer(self, plen: int) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(self.body_timeout_s + plen / MIN_RATE_BYTES_S, self._stalled)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _complete(self, msg: P.Message, payload: Payload | PutSink | None) -> None:
        self._frames.append((msg, payload))
        self._payload, self._msg, self._got, self._plen, self._partial_held = None, None, 0, 0, 0
        self._sink, self._sink_i, self._sink_off = None, 0, 0
        if self._start == self._end:
            self._start = self._end = 0
        self._cancel_timer()
        self._wake()

    def _stalled(self) -> None:
        self._fail(TimeoutError("a frame's body did not arrive in time"))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        self._cancel_timer()
        self._wake()

    def _drop_unhandled(self) -> None:
        """Give back the budget and memory of payloads the daemon has not taken (connection gone)."""
        if self._budget is not None:
            if self._admitting:
                self._budget.cancel(self._admitted)
                self._admitting = False
            held = self._partial_held + sum(
                len(p) for _, p in self._frames if p is not None and not isinstance(p, PutSink)
            )
            if held:
                self._budget.give(held)
        for _, p in self._frames:
            if isinstance(p, PutSink):
                p.release()
        if self._sink is not None:  # cut short: never published
            self._sink.release()
        self._partial_held = 0
        self._payload = self._msg = self._sink = None
        self._frames.clear()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the daemon's side ------------------------------------------------------------------------
    async def read_frame(self) -> tuple[P.Message, Payload | PutSink | None]:
        """The next frame; raises what broke the connection (``ProtocolError``, EOF, timeout).

        The caller owns the payload's budget share until it calls ``done_with(payload)``."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            await self._waiter
        frame = self._frames.popleft()
        try:
            self._parse()  # bytes of the next frame may already be here
        except P.ProtocolError as e:
            self._fail(e)
        if not self._frames and not self._admitting and self.transport is not None and self._error is None:
            self.transport.resume_reading()
        return frame

    def done_with(self, payload: Payload | PutSink | None) -> None:
        """The daemon has handled a frame from ``read_frame``: its payload's budget returns, and
        a large payload's memory goes to the warm pool (nothing may use it after this call); a
        sink's reservations the handler did not commit are returned."""
        if isinstance(payload, PutSink):
            payload.release()
            return
        if payload is not None and self._budget is not None:
            self._budget.give(len(payload))
        if isinstance(payload, mmap.mmap):
            _WARM.give(payload)

    async def send(self, msg: P.Message, parts: Sequence[memoryview] = ()) -> None:
        """Write a frame; returns once the kernel has taken all of it (``parts`` may be reused)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        size = sum(p.nbytes for p in parts)
        self.transport.write(P.encode_frame(msg, size))
        if size >= DIRECT_SEND_BYTES and self._fd >= 0:
            if self._drain is not None and not self._drain.done():
                await self._drain  # the header first: the transport's buffer must be empty
            await self._send_direct([p.cast("B") for p in parts if p.nbytes])
            return
        for p in parts:
            self.transport.write(p)
        if self._drain is not None and not self._drain.done():
            await self._drain

    async def _send_direct(self, views: list[memoryview]) -> None:
        """Write ``views`` to the socket with ``os.writev``, waiting for writability in between.
        Only while the transport has nothing buffered (so the bytes stay in order); the socket
        is non-blocking, so a full send buffer raises ``BlockingIOError`` and we wait."""
        i = 0
        while i < len(views):
            if self.transport is None or self.transport.is_closing() or self._fd < 0:
                raise ConnectionResetError("connection closed")
            try:
                sent = os.writev(self._fd, views[i : i + IOV_MAX])
            except (BlockingIOError, InterruptedError):
                await self._wait_writable()
                continue
            while i < len(views) and sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            if sent:
                views[i] = views[i][sent:]

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._writable is not None:
                self._loop.remove_writer(fd)
            os.close(fd)

    async def _wait_writable(self) -> None:
        fut = self._writable = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(self._fd, ready)
        try:
            await fut
        finally:
            if self._fd >= 0:
                self._loop.remove_writer(self._fd)
            self._writable = None

    async def send_error(self, code: str, message: str, timeout_s: float = 2.0) -> None:
        """Best effort: the peer may be gone or not reading."""
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.send(P.Error(code, message[:4000])), timeout_s)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def dispose(self) -> None:
        """Close, give everything back and break reference cycles; the object is dead after it."""
        self.close()
        self._close_fd()
        self._fail(ConnectionResetError("connection disposed"))
        self._drop_unhandled()
        self._error = ConnectionResetError("connection disposed")  # the raised one holds a traceback
        self._buf = bytearray()
        self._handler = None
        self.task = None
        self.transport = None
