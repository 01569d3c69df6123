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
  A put sends a chunk's contiguous slabs with ``sendmsg`` (scatter/gather: no copy of a strided
  view into a fresh buffer); a get receives into a recycled buffer (``RecvBuffers``: fresh
  memory costs a page fault per 4 KiB, on a VM more than the copy itself), which goes back when
  every chunk viewing it is released (``Chunk.release`` — after that the views may be reused,
  as with any tier's chunk views). A get given destinations (``into``: the caller's own output
  rows, ``Tier.batched_get_into``) receives each chunk's bytes straight into them with
  ``recvmsg_into`` — no buffer, and no copy by the caller — once the reply's header shows that
  its items match them (shape, dtype, size) and tile the payload in order; checked before any
  payload byte is read, else the payload goes to a buffer as without ``into``.

Not thread-safe by itself: ``RemoteTier`` serialises calls with a lock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from kvtier.chunk import Chunk, dtype_from_name
from kvtier.wire import protocol as P
from kvtier.wire.shm import SharedSegment
from kvtier.wire.shm import bytes_view as _bytes_view
from kvtier.wire.token_file import default_token_path, read_token_file

log = logging.getLogger(__name__)

RELEASE_BATCH = 256
IOV_MAX = 1024  # buffers per sendmsg (Linux's limit)
RECV_BUFFERS_KEPT = 4
RECV_BUFFERS_MAX_BYTES = 512 << 20
"""At most this many recycled receive buffers, of at most this many bytes together, are kept."""
_T = TypeVar("_T")


class RecvBuffers:
    """Recycled receive buffers of one client. ``take(n)`` gives a buffer of at least ``n`` bytes
    and a ``give_back`` for it; buffers beyond ``RECV_BUFFERS_KEPT`` / ``..._MAX_BYTES`` are
    left to the garbage collector. Thread-safe (chunks are released from any thread)."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        with self._lock:
            fits = [b for b in self._free if n <= len(b) <= 2 * n]
            if fits:
                buf = min(fits, key=len)
                self._free.remove(buf)
                return buf
        return bytearray(n)

    def give_back(self, buf: bytearray) -> None:
        with self._lock:
            if (
                len(self._free) < RECV_BUFFERS_KEPT
                and sum(map(len, self._free)) + len(buf) <= RECV_BUFFERS_MAX_BYTES
            ):
                self._free.append(buf)


class _Shared:
    """A receive buffer shared by the chunks of one reply: back to the pool after the last release."""

    def __init__(self, pool: RecvBuffers, buf: bytearray, users: int) -> None:
        self._pool, self._buf, self._users = pool, buf, users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self._pool.give_back(self._buf)


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
        self._recv_buffers = RecvBuffers()

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
        """The frame in ``sendmsg`` calls of up to ``IOV_MAX`` buffers (a partial send resumes)."""
        assert self.sock is not None
        views = [memoryview(P.encode_frame(msg, sum(p.nbytes for p in parts)))]
        views += [p.cast("B") for p in parts if p.nbytes]
        i = 0
        while i < len(views):
            sent = self.sock.sendmsg(views[i : i + IOV_MAX])
            while i < len(views) and sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            if sent:
                views[i] = views[i][sent:]

    def _recv_exact(self, n: int, buf: bytearray | None = None) -> bytearray:
        """``n`` bytes, into the start of ``buf`` if given (else a new buffer)."""
        assert self.sock is not None
        buf = bytearray(n) if buf is None else buf
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("the kvtier daemon closed the connection")
            got += k
        return buf

    def _recv_views(self, views: list[memoryview]) -> None:
        """Fill ``views`` in order from the socket (``recvmsg_into`` of up to ``IOV_MAX`` at a time)."""
        assert self.sock is not None
        i = 0
        while i < len(views):
            k = self.sock.recvmsg_into(views[i : i + IOV_MAX])[0]
            if k == 0:
                raise ConnectionResetError("the kvtier daemon closed the connection")
            while i < len(views) and k >= views[i].nbytes:
                k -= views[i].nbytes
                i += 1
            if k:
                views[i] = views[i][k:]

    def _roundtrip(
        self,
        msg: P.Message,
        parts: Sequence[memoryview],
        *,
        max_payload: int | None = None,
        recycled: RecvBuffers | None = None,
        place: Placement | None = None,
    ) -> tuple[P.Message, bytearray]:
        """Send ``msg`` and read the reply; its payload goes into the views ``place(reply,
        payload_len)`` returns (they sum to ``payload_len``; the returned buffer is then empty),
        else into a buffer from ``recycled`` if given (the caller gives it back), else a new one."""
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
            views = place(reply, plen) if plen and place is not None else None
            if views is not None:
                self._recv_views(views)
                payload = bytearray()
            else:
                payload = (
                    self._recv_exact(plen, recycled.take(plen) if recycled else None) if plen else bytearray()
                )
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

    def get(
        self, keys: Sequence[bytes], into: Sequence[torch.Tensor | None] | None = None
    ) -> list[Chunk | None]:
        """The chunks of ``keys`` (``None``: a miss). ``into[i]``, if given: a CPU tensor of key
        ``i``'s expected shape and dtype to receive its bytes into; a hit received there is a
        chunk whose ``kv`` *is* ``into[i]``. Used only when every inline item of a reply fits
        its destination (see the module docstring), else ignored; on an error (or a miss) the
        destinations may hold partial data."""
        if into is not None and len(into) != len(keys):
            raise P.ProtocolError(f"{len(into)} destinations for {len(keys)} keys: pass one per key")
        out: list[Chunk | None] = []
        for i in range(0, len(keys), P.MAX_KEYS):
            pool = self._recv_buffers
            dests = into[i : i + P.MAX_KEYS] if into is not None else None
            placer = _Placer(dests) if dests is not None else None
            r, payload = self._roundtrip(
                P.Get(list(keys[i : i + P.MAX_KEYS]), shm=self.shm), [], recycled=pool, place=placer
            )
            if not isinstance(r, P.GetReply):
                raise P.ProtocolError(f"expected a get reply, got {type(r).__name__}")
            if placer is not None and placer.used:
                out += [
                    self._placed(it, d) if it is not None else None for it, d in zip(r.items, placer.dests)
                ]
                continue
            inline = sum(1 for it in r.items if it is not None and it.where != "shm")
            if not inline:
                if payload:
                    pool.give_back(payload)
                shared = None
            else:
                shared = _Shared(pool, payload, inline)
            src = torch.frombuffer(payload, dtype=torch.uint8) if payload else None
            out += [self._chunk(it, src, shared) if it is not None else None for it in r.items]
        return out

    def _placed(self, it: P.GotItem, dest: torch.Tensor | None) -> Chunk:
        """A hit of a reply received by ``_Placer``: an inline one is its destination itself."""
        if it.where == "shm":
            return self._chunk(it, None)
        assert dest is not None  # _placement matched every inline item to a destination
        return Chunk(dest, it.meta.fingerprint, it.meta.num_tokens)

    def _chunk(self, it: P.GotItem, src: torch.Tensor | None, shared: _Shared | None = None) -> Chunk:
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
        if it.nbytes != math.prod(shape) * P.KV_DTYPES[m.dtype]:
            raise P.ProtocolError(
                f"daemon's get reply: {it.nbytes} bytes for a {m.dtype} chunk of shape {list(shape)}"
            )
        kv = src[it.offset : it.offset + it.nbytes].view(dtype).view(shape)
        return Chunk(kv, m.fingerprint, m.num_tokens, shared.release if shared is not None else None)

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
            parts += _slabs(c.kv.detach().cpu())
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


def _slabs(t: torch.Tensor) -> list[memoryview]:
    """``t``'s bytes in order as contiguous pieces, without copying when each ``t[l, p]`` of a
    ``[layers, planes, tokens, ...]`` token-range view is contiguous (a chunk cut from a larger
    store is exactly that); anything else is made contiguous once."""
    if t.is_contiguous():
        return [_bytes_view(t)]
    if t.dim() >= 3 and t[0, 0].is_contiguous():
        return [_bytes_view(t[a, b]) for a in range(t.shape[0]) for b in range(t.shape[1])]
    return [_bytes_view(t.contiguous())]


Placement = Callable[[P.Message, int], "list[memoryview] | None"]
"""Given a reply and its payload length (before any payload byte is read): the views to receive
the payload into, or ``None`` for a buffer."""


class _Placer:
    """A ``Placement`` into fixed destinations (``_placement``), remembering whether it was used."""

    def __init__(self, dests: Sequence[torch.Tensor | None]) -> None:
        self.dests = dests
        self.used = False

    def __call__(self, r: P.Message, plen: int) -> list[memoryview] | None:
        views = _placement(r, plen, self.dests)
        self.used = views is not None
        return views


def _placement(r: P.Message, plen: int, dests: Sequence[torch.Tensor | None]) -> list[memoryview] | None:
    """The views of ``dests`` that a get reply's payload can be received into, or ``None``.

    Only when every inline item has a destination of its exact shape, dtype and size, the
    items tile the payload in order from offset 0 and end at ``plen``, and each destination's
    bytes are contiguous pieces (``_recv_slabs``). So a daemon's header can never make the
    client write past a destination or land bytes in the wrong one."""
    if not isinstance(r, P.GetReply) or len(r.items) != len(dests):
        return None
    views: list[memoryview] = []
    end = 0
    for it, d in zip(r.items, dests):
        if it is None or it.where != "inline":
            continue
        if (
            d is None
            or it.offset != end
            or d.device.type != "cpu"
            or str(d.dtype).removeprefix("torch.") != it.meta.dtype
            or list(d.shape) != it.meta.shape
            or d.numel() * d.element_size() != it.nbytes
        ):
            return None
        slabs = _recv_slabs(d)
        if slabs is None:
            return None
        views += slabs
        end += it.nbytes
    return views if end == plen and views else None


def _recv_slabs(t: torch.Tensor) -> list[memoryview] | None:
    """Writable views of ``t``'s bytes in order, as ``_slabs`` cuts them but never copying:
    ``None`` when ``t`` is neither contiguous nor made of contiguous ``t[l, p]`` rows."""
    if t.numel() == 0 or t.requires_grad:
        return None
    if t.is_contiguous():
        return [_bytes_view(t)]
    if t.dim() >= 3 and t[0, 0].is_contiguous():
        return [_bytes_view(t[a, b]) for a in range(t.shape[0]) for b in range(t.shape[1])]
    return None


def _expect(r: P.Message, cls: type[_T]) -> _T:
    if not isinstance(r, cls):
        raise P.ProtocolError(f"expected a {cls.__name__} reply, got {type(r).__name__}")
    return r


def _meta(c: Chunk) -> P.ItemMeta:
    return P.ItemMeta(c.fingerprint, c.num_tokens, list(c.kv.shape), str(c.kv.dtype).removeprefix("torch."))
