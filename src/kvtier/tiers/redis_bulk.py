"""Pipelined ``GET``s whose bulk replies are read straight off the socket (standalone Redis).

What bounds the Redis tier's reads is redis-py's reply path: its parser reads the socket in
pieces, hands them to hiredis, which assembles each MiB-sized value into a new ``bytes`` — a
Python-level loop per piece and one more copy of every byte. Here each reply's ``$<len>\\r\\n``
line is parsed from a small buffer and the value is received with ``recv_into`` directly into
its final buffer (one kernel copy), the way a C client does.

Invariants: only ``GET`` replies (a bulk string, or nil in RESP2 or RESP3) are accepted; anything else — an error
reply, a malformed line, bytes left over after the last reply — raises, and the caller drops
the connection (``disconnect``), so a desynchronised stream is never reused. The socket keeps
redis-py's timeout, so every read is bounded by ``timeout_s``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import xxhash
from redis.exceptions import InvalidResponse

from kvtier.errors import KVTierError

LINE_MAX = 64
READ_PIECE = 64 << 10


class RedisErrorReply(KVTierError, redis.ResponseError):
    """Redis answered a GET with an error reply (``-ERR``, ``-OOM`` ...): the store refused."""


class MalformedReply(KVTierError, InvalidResponse):
    """Bytes that are no GET reply (a desynchronised stream): the connection is dropped."""


class ReplyCutShort(KVTierError, ConnectionResetError):
    """Redis closed the connection in the middle of a reply."""


class BulkReader:
    """Reads RESP bulk replies from ``sock``; ``pending`` holds bytes read past the last one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()

    def _fill(self) -> None:
        got = self.sock.recv(READ_PIECE)
        if not got:
            raise ReplyCutShort("redis closed the connection mid-reply")
        self.pending += got

    def line(self) -> bytes:
        while True:
            end = self.pending.find(b"\r\n")
            if end >= 0:
                out = bytes(self.pending[:end])
                del self.pending[: end + 2]
                return out
            if len(self.pending) > LINE_MAX:
                raise MalformedReply("malformed reply line from redis")
            self._fill()

    def _size(self) -> int | None:
        """The next bulk reply's length (``None``: nil); raises on anything but a bulk reply."""
        head = self.line()
        if head == b"_":  # RESP3's null (redis-py 8 speaks RESP3 where the server does)
            return None
        if head.startswith(b"-"):
            raise RedisErrorReply(head[1:].decode(errors="replace"))
        if not head.startswith(b"$"):
            raise MalformedReply(f"expected a bulk reply from redis, got {head[:20]!r}")
        n = int(head[1:])
        return None if n < 0 else n

    def bulk(self) -> bytearray | None:
        n = self._size()
        return None if n is None else self._value(n)

    def bulk_into(self, slabs: Sequence[memoryview]) -> Received | bytearray | None:
        """The next reply received straight into ``slabs`` (writable byte views, filled in order)
        when its length is theirs together, hashed (xxh3-64) slab by slab as it lands; a reply of
        another length comes back as a ``bytearray`` (the caller decodes it the usual way)."""
        n = self._size()
        if n is None:
            return None
        if n != sum(len(v) for v in slabs):
            return self._value(n)
        hasher = xxhash.xxh3_64()
        for v in slabs:
            take = min(len(self.pending), len(v))
            v[:take] = self.pending[:take]
            del self.pending[:take]
            got = take
            while got < len(v):
                k = self.sock.recv_into(v[got:])
                if k == 0:
                    raise ReplyCutShort("redis closed the connection mid-reply")
                got += k
            hasher.update(v)
        while len(self.pending) < 2:
            self._fill()
        if self.pending[:2] != b"\r\n":
            raise MalformedReply("bulk reply from redis not terminated by CRLF")
        del self.pending[:2]
        return Received(n, hasher.intdigest())

    def _value(self, n: int) -> bytearray:
        out = bytearray(n + 2)  # the value and its trailing CRLF
        view = memoryview(out)
        take = min(len(self.pending), n + 2)
        view[:take] = self.pending[:take]
        del self.pending[:take]
        got = take
        while got < n + 2:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ReplyCutShort("redis closed the connection mid-reply")
            got += k
        view.release()  # no export may remain when it shrinks below
        if out[n:] != b"\r\n":
            raise MalformedReply("bulk reply from redis not terminated by CRLF")
        del out[n:]  # shrinks in place (no copy of the value)
        return out


@dataclass(frozen=True)
class Received:
    """A reply ``bulk_into`` wrote into the caller's slabs: its length and xxh3-64."""

    nbytes: int
    checksum: int


Dest = Callable[[int, list[Any]], Sequence[memoryview] | None]
"""``dest(j, replies so far)``: where reply ``j`` may land (``bulk_into``), or ``None``: a buffer of its own."""


def get_many(client: redis.Redis, names: Sequence[str], dest: Dest | None = None) -> list[Any]:
    """``GET`` of every name in one pipelined round trip over one pooled connection: per name a
    ``bytearray``, ``None`` (absent) or, where ``dest`` gave slabs of the reply's size, ``Received``."""
    pool: Any = client.connection_pool
    conn = pool.get_connection()
    ok = False
    try:
        conn.send_packed_command(conn.pack_commands([("GET", n) for n in names]))
        sock = conn._sock  # NOTE: redis-py's own socket; its parser holds nothing between commands
        if sock is None:
            raise ReplyCutShort("redis connection closed")
        reader = BulkReader(sock)
        out: list[Any] = []
        for j in range(len(names)):
            slabs = dest(j, out) if dest is not None else None
            out.append(reader.bulk() if slabs is None else reader.bulk_into(slabs))
        if reader.pending:
            raise MalformedReply("unexpected bytes after the replies from redis")
        ok = True
        return out
    finally:
        if not ok:
            conn.disconnect()
        pool.release(conn)
