"""One client connection of the daemon: an ``asyncio.BufferedProtocol`` that parses frames.

Why a buffered protocol rather than streams or ``sock_recv_into``: a ``StreamReader`` copies
every payload byte three times (``recv`` into a new ``bytes``, into its buffer, out again), and
``loop.sock_recv_into`` re-registers the socket with epoll for every read. Here the transport
reads straight into memory we hand it (``get_buffer``): prefixes and headers into one small
reusable buffer, a payload directly into its final ``bytearray`` — one copy, the kernel's —
while the socket stays registered.

Flow control: after each complete frame the transport is paused until the daemon takes the
frame (requests are handled one at a time per connection), so a client cannot queue unbounded
work. A frame whose prefix breaks the limits poisons the connection (``ProtocolError``); a frame
whose body does not arrive within its time limit aborts it (``TimeoutError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from kvtier.wire import protocol as P

SMALL_BUFFER = 256 << 10


class Conn(asyncio.BufferedProtocol):
    def __init__(
        self, handler: Callable[[Conn], Coroutine[Any, Any, None]], *, body_timeout_s: float = 60.0
    ) -> None:
        self._handler = handler
        self.body_timeout_s = body_timeout_s
        self.max_header = P.MAX_HELLO_BYTES
        self.max_payload = 0
        """Limits for the next frame; the daemon raises them after the handshake."""
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(SMALL_BUFFER)
        self._start = self._end = 0
        self._msg: P.Message | None = None  # header decoded, payload pending
        self._payload: bytearray | None = None
        self._got = 0
        self._frames: deque[tuple[P.Message, bytearray | None]] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

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
        self.task = self._loop.create_task(self._handler(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._payload is not None:
            return memoryview(self._payload)[self._got :]
        if self._end == len(self._buf):  # compact, or grow for a large header
            live = self._buf[self._start : self._end]
            size = max(SMALL_BUFFER, len(live) * 2)
            self._buf = live + bytearray(size - len(live))
            self._start, self._end = 0, len(live)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._payload is not None:
            self._got += nbytes
        else:
            self._end += nbytes
        try:
            self._parse()
        except P.ProtocolError as e:
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or asyncio.IncompleteReadError(b"", None))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- parsing ----------------------------------------------------------------------------------
    def _parse(self) -> None:
        """Turn buffered bytes into frames; pauses reading once a frame is ready."""
        while not self._frames and self._error is None:
            if self._payload is not None:
                if self._got < len(self._payload):
                    return
                assert self._msg is not None
                self._complete(self._msg, self._payload)
                continue
            avail = self._end - self._start
            if avail < P.PREFIX.size:
                return
            hlen, plen = P.parse_prefix(bytes(self._buf[self._start : self._start + P.PREFIX.size]),
                                        max_header=self.max_header, max_payload=self.max_payload)  # fmt: skip
            if self._timer is None:
                self._timer = self._loop.call_later(self.body_timeout_s + plen / 50e6, self._stalled)
            if avail < P.PREFIX.size + hlen:
                return
            h0 = self._start + P.PREFIX.size
            msg = P.decode_header(bytes(self._buf[h0 : h0 + hlen]))
            self._start = h0 + hlen
            if plen == 0:
                self._complete(msg, None)
                continue
            take = min(plen, self._end - self._start)  # payload bytes that came with the header
            self._payload = bytearray(plen)
            self._payload[:take] = self._buf[self._start : self._start + take]
            self._start += take
            self._got, self._msg = take, msg
        if self._frames and self.transport is not None:
            self.transport.pause_reading()

    def _complete(self, msg: P.Message, payload: bytearray | None) -> None:
        self._frames.append((msg, payload))
        self._payload, self._msg, self._got = None, None, 0
        if self._start == self._end:
            self._start = self._end = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _stalled(self) -> None:
        self._fail(TimeoutError("a frame's body did not arrive in time"))
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the daemon's side ------------------------------------------------------------------------
    async def read_frame(self) -> tuple[P.Message, bytearray | None]:
        """The next frame; raises what broke the connection (``ProtocolError``, EOF, timeout)."""
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
        if not self._frames and self.transport is not None and self._error is None:
            self.transport.resume_reading()
        return frame

    async def send(self, msg: P.Message, parts: Sequence[memoryview] = ()) -> None:
        """Write a frame; returns once the kernel has taken all of it (``parts`` may be reused)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(P.encode_frame(msg, sum(p.nbytes for p in parts)))
        for p in parts:
            self.transport.write(p)
        if self._drain is not None and not self._drain.done():
            await self._drain

    async def send_error(self, code: str, message: str, timeout_s: float = 2.0) -> None:
        """Best effort: the peer may be gone or not reading."""
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.send(P.Error(code, message[:4000])), timeout_s)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
