"""A blocking client of the kvtier daemon: one TCP connection, shared memory when on the same host.

Every socket operation has a timeout (``timeout_s``); a failure raises ``OSError`` (connection
refused/reset, ``TimeoutError``) or ``ProtocolError``, and leaves the client disconnected —
``tiers/remote.py`` turns those into misses and reconnects with backoff.

KV paths (chosen per connection, by the handshake):
* shared memory — the daemon's pool segment is mapped here. ``get`` returns chunks that *view*
  the pool in place, leased: ``Chunk.release`` queues the lease's return, sent in front of the
  next request (or at once past ``RELEASE_BATCH``). ``put`` reserves pool space, copies the KV
  straight into it, and commits.
* socket — KV bytes ride in the frame payload (a client on another host, or ``use_shm=False``).

Not thread-safe by itself: ``RemoteTier`` serialises calls with a lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import TypeVar

import torch

from kvtier.chunk import Chunk, dtype_from_name
from kvtier.wire import protocol as P
from kvtier.wire.shm import SharedSegment
from kvtier.wire.shm import bytes_view as _bytes_view
from kvtier.wire.token_file import default_token_path, read_token_file

log = logging.getLogger(__name__)

RELEASE_BATCH = 256
_T = TypeVar("_T")


class DaemonError(P.ProtocolError):
    """The daemon answered ``Error``; ``code`` is ``invalid`` (this request), ``auth``, ``protocol``..."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"daemon error [{code}]: {message}")
        self.code = code


class DaemonClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str = "",
        timeout_s: float = 2.0,
        use_shm: bool = True,
        client_name: str = "",
        token_file: str = "",
    ) -> None:
        self.host, self.port = host, port
        self.token = token
        self.token_file = token_file or str(default_token_path(port))
        """Read at every connect when ``token`` is empty: a restarted daemon may have a new one."""
        self.timeout_s = timeout_s
        self.use_shm = use_shm
        self.register_cuda = True
        """Page-lock the mapped pool for CUDA when a GPU is present (GPU copies at pinned speed)."""
        self.client_name = client_name or f"pid{os.getpid()}"
        self.sock: socket.socket | None = None
        self.welcome: P.Welcome | None = None
        self.segment: SharedSegment | None = None
        self.generation = 0
        self._pending: list[int] = []
        self._plock = threading.Lock()

    # -- connection -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.sock is not None

    @property
    def shm(self) -> bool:
        return self.segment is not None

    def connect(self) -> None:
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout_s)
        self.sock = sock
        try:
            token = self.token or read_token_file(self.token_file)
            hello = P.Hello(P.PROTOCOL_VERSION, token, self.use_shm, self.client_name)
            w, _ = self._roundtrip(hello, [], max_payload=0)
            if not isinstance(w, P.Welcome) or w.version != P.PROTOCOL_VERSION:
                raise P.ProtocolError(f"unexpected handshake reply {w!r}")
        except BaseException:
            self.close()
            raise
        self.welcome = w
        self.generation += 1
        with self._plock:
            self._pending.clear()
        if self.segment is not None and str(self.segment.path) != w.shm_path:
            self.segment.close()  # a new daemon run: forget the old mapping (views keep it alive)
            self.segment = None
        if w.shm_path and self.segment is None:
            try:
                self.segment = SharedSegment.attach(w.shm_path, w.shm_bytes, w.shm_nonce)
            except (OSError, ValueError) as e:  # another host, or no access: use the socket
                log.info("kvtier daemon's shared memory not usable here (%s); KV goes over the socket", e)
            if self.segment is not None and self.register_cuda and torch.cuda.is_available():
                self.segment.register_cuda()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self._flush_releases()
            self.sock.close()
            self.sock = None

    # -- framing --------------------------------------------------------------------------------
    def _send(self, msg: P.Message, parts: Sequence[memoryview]) -> None:
        assert self.sock is not None
        self.sock.sendall(P.encode_frame(msg, sum(p.nbytes for p in parts)))
        for p in parts:
            self.sock.sendall(p)

    def _recv_exact(self, n: int) -> bytearray:
        assert self.sock is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("the kvtier daemon closed the connection")
            got += k
        return buf

    def _roundtrip(
        self, msg: P.Message, parts: Sequence[memoryview], *, max_payload: int | None = None
    ) -> tuple[P.Message, bytearray]:
        if self.sock is None:
            raise ConnectionError("not connected to the kvtier daemon")
        try:
            self._flush_releases()
            self._send(msg, parts)
            limit = self.welcome.max_payload_bytes if max_payload is None and self.welcome else 0
            hlen, plen = P.parse_prefix(
                bytes(self._recv_exact(P.PREFIX.size)), max_header=P.MAX_HEADER_BYTES, max_payload=limit or 0
            )
            reply = P.decode_header(bytes(self._recv_exact(hlen)))
            payload = self._recv_exact(plen) if plen else bytearray()
        except (OSError, P.ProtocolError):
            self.close()
            raise
        if isinstance(reply, P.Error):
            if reply.code != "invalid":
                self.close()
            raise DaemonError(reply.code, reply.message)
        return reply, payload

    def _flush_releases(self, force: bool = True) -> None:
        with self._plock:
            if not self._pending or (not force and len(self._pending) < RELEASE_BATCH):
                return
            leases, self._pending = self._pending[: P.MAX_KEYS], self._pending[P.MAX_KEYS :]
        self._send(P.Release(leases), [])

    def _release_later(self, generation: int, lease: int) -> None:
        with self._plock:
            if generation == self.generation:  # a lease of a past connection died with it
                self._pending.append(lease)

    # -- operations -----------------------------------------------------------------------------
    def prefix(self, keys: Sequence[bytes]) -> int:
        n = 0
        for i in range(0, len(keys), P.MAX_KEYS):
            batch = list(keys[i : i + P.MAX_KEYS])
            r = _expect(self._roundtrip(P.Prefix(batch), [])[0], P.Count)
            n += r.n
            if r.n < len(batch):
                break
        return n

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(keys), P.MAX_KEYS):
            r = _expect(self._roundtrip(P.Contains(list(keys[i : i + P.MAX_KEYS])), [])[0], P.Bools)
            out += r.values
        return out

    def get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        out: list[Chunk | None] = []
        for i in range(0, len(keys), P.MAX_KEYS):
            r, payload = self._roundtrip(P.Get(list(keys[i : i + P.MAX_KEYS]), shm=self.shm), [])
            if not isinstance(r, P.GetReply):
                raise P.ProtocolError(f"expected a get reply, got {type(r).__name__}")
            src = torch.frombuffer(payload, dtype=torch.uint8) if payload else None
            out += [self._chunk(it, src) if it is not None else None for it in r.items]
        return out

    def _chunk(self, it: P.GotItem, src: torch.Tensor | None) -> Chunk:
        m = it.meta
        if m.dtype not in P.KV_DTYPES:
            raise P.ProtocolError(f"daemon sent a chunk of unknown dtype {m.dtype!r}")
        dtype = dtype_from_name(m.dtype)
        shape = tuple(m.shape)
        if it.where == "shm":
            if self.segment is None:
                raise P.ProtocolError("daemon sent a shared-memory chunk to a socket-only client")
            gen, lease = self.generation, it.lease
            kv = self.segment.view(it.offset, shape, dtype)
            return Chunk(kv, m.fingerprint, m.num_tokens, lambda: self._release_later(gen, lease))
        if src is None or it.offset + it.nbytes > src.numel():
            raise P.ProtocolError("daemon's get reply overruns its payload")
        kv = src[it.offset : it.offset + it.nbytes].view(dtype).view(shape)
        return Chunk(kv, m.fingerprint, m.num_tokens)

    def put(self, items: Sequence[tuple[bytes, Chunk]]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(items), P.MAX_KEYS):
            batch = items[i : i + P.MAX_KEYS]
            out += self._put_shm(batch) if self.shm else self._put_socket(batch)
        return out

    def _put_shm(self, items: Sequence[tuple[bytes, Chunk]]) -> list[bool]:
        assert self.segment is not None
        r = _expect(self._roundtrip(P.Reserve([P.PutItem(k, _meta(c)) for k, c in items]), [])[0], P.Reserved)
        result: list[bool | None] = []
        rids = []
        for slot, (_, c) in zip(r.slots, items):
            if slot.status == "ok":
                self.segment.view(slot.offset, tuple(c.kv.shape), c.kv.dtype).copy_(c.kv)
                rids.append(slot.reservation)
                result.append(None)
            else:
                result.append(slot.status == "exists")
        if rids:
            done = _expect(self._roundtrip(P.Commit(rids), [])[0], P.Bools)
            it = iter(done.values)
            result = [next(it) if x is None else x for x in result]
        return [bool(x) for x in result]

    def _put_socket(self, items: Sequence[tuple[bytes, Chunk]]) -> list[bool]:
        limit = self.welcome.max_payload_bytes if self.welcome else 0
        out: list[bool] = []
        batch: list[P.PutItem] = []
        parts: list[memoryview] = []
        size = 0
        for key, c in [*items, (b"", None)]:
            n = c.nbytes if c is not None else 0
            if batch and (c is None or size + n > limit):
                r = _expect(self._roundtrip(P.Put(batch), parts)[0], P.Bools)
                out += r.values
                batch, parts, size = [], [], 0
            if c is None:
                break
            batch.append(P.PutItem(key, _meta(c), size))
            parts.append(_bytes_view(c.kv.detach().cpu()))
            size += n
        return out

    def remove(self, keys: Sequence[bytes]) -> int:
        r = _expect(self._roundtrip(P.Remove(list(keys)[: P.MAX_KEYS]), [])[0], P.Count)
        return r.n

    def clear(self) -> None:
        self._roundtrip(P.Clear(), [])

    def stats(self) -> dict[str, dict[str, float]]:
        r = _expect(self._roundtrip(P.Stats(), [])[0], P.StatsReply)
        return r.stats

    def flush(self, timeout_s: float) -> bool:
        """Ask the daemon to make every write it accepted durable; waits up to ``timeout_s``
        (plus this client's own ``timeout_s`` for the round trip)."""
        if self.sock is None:
            raise ConnectionError("not connected to the kvtier daemon")
        self.sock.settimeout(timeout_s + self.timeout_s)
        try:
            r = _expect(self._roundtrip(P.Flush(timeout_s), [])[0], P.Flushed)
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.timeout_s)
        return r.ok

    def ping(self) -> None:
        self._roundtrip(P.Ping(), [])


def _expect(r: P.Message, cls: type[_T]) -> _T:
    if not isinstance(r, cls):
        raise P.ProtocolError(f"expected a {cls.__name__} reply, got {type(r).__name__}")
    return r


def _meta(c: Chunk) -> P.ItemMeta:
    return P.ItemMeta(c.fingerprint, c.num_tokens, list(c.kv.shape), str(c.kv.dtype).removeprefix("torch."))
