"""One client connection of the daemon: exact-size async reads and writes on a raw socket.

Why not asyncio streams: a ``StreamReader`` copies every byte three times (``recv`` into a new
``bytes``, into its buffer, out of it again on ``readexactly``) and a ``StreamWriter`` buffers
what the kernel does not take at once. Here ``loop.sock_recv_into`` lands the payload straight
in its final buffer (one copy, the kernel's) and ``loop.sock_sendall`` sends the pool's own
memory without staging it — for socket clients that is most of the daemon's cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

from kvtier.server import protocol as P


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly; ``IncompleteReadError`` if the peer closes first."""
        got, n = 0, len(view)
        while got < n:
            k = await self._loop.sock_recv_into(self.sock, view[got:])
            if k == 0:
                raise asyncio.IncompleteReadError(bytes(view[:got]), n)
            got += k

    async def recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        await self.recv_into(memoryview(buf))
        return buf

    async def read_frame(self, *, max_header: int, max_payload: int, first_timeout: float | None,
                         body_timeout: float) -> tuple[P.Message, bytearray | None]:  # fmt: skip
        """One frame, size-checked from its prefix before any of its body is read."""
        prefix = await asyncio.wait_for(self.recv(P.PREFIX.size), first_timeout)
        hlen, plen = P.parse_prefix(bytes(prefix), max_header=max_header, max_payload=max_payload)
        timeout = body_timeout + plen / 50e6
        header = await asyncio.wait_for(self.recv(hlen), timeout)
        payload = await asyncio.wait_for(self.recv(plen), timeout) if plen else None
        return P.decode_header(bytes(header)), payload

    async def send(self, msg: P.Message, parts: Sequence[memoryview] = ()) -> None:
        await self._loop.sock_sendall(self.sock, P.encode_frame(msg, sum(p.nbytes for p in parts)))
        for p in parts:
            await self._loop.sock_sendall(self.sock, p)

    async def send_error(self, code: str, message: str, timeout_s: float = 2.0) -> None:
        """Best effort: the peer may be gone or not reading."""
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.send(P.Error(code, message[:4000])), timeout_s)

    def close(self) -> None:
        self.sock.close()
