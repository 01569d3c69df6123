"""A producer -> consumer KV channel for prefill/decode on one host (issue 20 groundwork).

The prefill instance's worker (``ChannelServer``, the producer) *offers* each chunk it computed,
by chunk digest, with the chunk's KV still in its memory (a GPU buffer); the decode instance's
worker (``ChannelClient``) *fetches* the chunks of a prompt: it gets CUDA IPC handles, maps the
producer's memory and copies device to device (NVLink / PCIe peer access), never through host
memory. ``receive_kv`` is what a consumer calls: the leading chunks the channel delivers, then
the rest from the tiers (``CacheEngine.retrieve_chunks``), where the producer stores every chunk
as well (``send_kv``), so the KV stays reusable by any later request.

Falls back to the tier path (fetch answers 0 chunks, counted by reason in ``ChannelStats``) when
the producer is unreachable (no socket, refused, timed out, dropped), on another host, when
either side is not on CUDA (unless the consumer accepts host ``shm`` handles), when mapping a
handle fails, or when it does not hold the chunks (evicted from its bounded outbox, or never
offered). A failing channel costs at most ``timeout_s`` once, then ``retry_s`` of fallbacks
before it is tried again: never a failed request.

Lifetime: an offered tensor is kept (not copied, for CUDA; the caller must not write it again)
until the outbox evicts it (oldest first, beyond ``max_bytes``) or ``close()``; a chunk offered to
a consumer is not evicted until that consumer says ``Done`` (or ``lease_s`` passes). torch's IPC
reference counts keep the memory valid while a consumer maps it in any case.

Security: the control socket is a Unix socket created 0600 (same user only), carrying typed
msgspec frames (``channel_protocol``): nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvtier.engine import CacheEngine
from kvtier.errors import KVTierError
from kvtier.keys import KeyExtras, TokenInput, tokens_to_array

from . import channel_protocol as P
from .channel_handles import Exported, Mapped, export, map_item

log = logging.getLogger(__name__)


class ChannelError(KVTierError, ValueError):
    """A channel used wrongly (bad socket path, offering a tensor that cannot be exported)."""


def host_id() -> str:
    """This machine's identity: hostname + boot id (CUDA IPC and shm work only within one boot)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def device_name(device: torch.device) -> str:
    return f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"


@dataclass
class ChannelStats:
    fetches: int = 0
    chunks: int = 0
    """Chunks delivered through the channel."""
    bytes: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    """Why a fetch delivered less than asked (``unreachable``, ``refused``, ``not-held``, ...)."""


@dataclass
class _Entry:
    exp: Exported
    leased_until: float = 0.0


class ChannelServer:
    """The producer's end: an outbox of offered chunks, served over a Unix socket at ``path``."""

    def __init__(self, path: str, *, max_bytes: int = 8 << 30, lease_s: float = 30.0) -> None:
        if not path or len(path.encode()) > 100:
            raise ChannelError(f"channel socket path {path!r}: give a path of at most 100 bytes")
        self.path = path
        self.max_bytes = max_bytes
        self.lease_s = lease_s
        self.host = host_id()
        self._box: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._device = "cpu"
        self._sock: socket.socket | None = None
        self._closed = False
        self._conns: set[socket.socket] = set()
        self.served_chunks = 0
        self.refusals = 0

    # -- outbox ---------------------------------------------------------------------------------
    def offer(self, key: bytes, kv: torch.Tensor) -> bool:
        """Hold ``kv`` (one chunk's KV) for consumers under chunk digest ``key``; ``False`` if it
        is larger than the whole outbox. CUDA tensors are kept, not copied: do not write them again."""
        exp = export(key, kv)
        if exp.nbytes > self.max_bytes:
            exp.close()
            return False
        if kv.device.type == "cuda":
            self._device = device_name(kv.device)
        with self._lock:
            old = self._box.pop(key, None)
            if old is not None:
                self._bytes -= old.exp.nbytes
                old.exp.close()
            self._box[key] = _Entry(exp)
            self._bytes += exp.nbytes
            self._evict()
        return True

    def _evict(self) -> None:
        now = time.monotonic()
        for key in list(self._box):
            if self._bytes <= self.max_bytes:
                return
            e = self._box[key]
            if e.leased_until > now:
                continue
            del self._box[key]
            self._bytes -= e.exp.nbytes
            e.exp.close()

    def held(self) -> int:
        with self._lock:
            return len(self._box)

    # -- serving --------------------------------------------------------------------------------
    def start(self) -> ChannelServer:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of a dead producer
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: same user only
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.listen(16)
        self._sock = s
        threading.Thread(target=self._accept, name="kvtier-channel", daemon=True).start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="kvtier-channel-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        leased: dict[int, list[bytes]] = {}
        with self._lock:
            self._conns.add(conn)
        try:
            with conn:
                hello = P.recv(conn)
                if not isinstance(hello, P.Hello):
                    raise P.ChannelProtocolError(f"expected hello, got {type(hello).__name__}")
                kind: P.HandleKind = "cuda" if self._device.startswith("cuda") else "shm"
                reason = self._refusal(hello, kind)
                if reason:
                    self.refusals += 1
                    P.send(conn, P.Refuse(reason))
                    return
                P.send(conn, P.Hello(P.CHANNEL_VERSION, self.host, self._device, [kind]))
                while True:
                    msg = P.recv(conn)
                    if isinstance(msg, P.Fetch):
                        items, keys = self._lease(msg.keys)
                        leased[msg.req] = keys
                        P.send(conn, P.Offer(msg.req, items))
                    elif isinstance(msg, P.Done):
                        self._unlease(leased.pop(msg.req, []))
                    else:
                        raise P.ChannelProtocolError(f"unexpected {type(msg).__name__} from a consumer")
        except (OSError, P.ChannelProtocolError) as e:  # the consumer went away or spoke garbage
            log.debug("channel: consumer connection ended: %s", e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            for keys in leased.values():
                self._unlease(keys)

    def _refusal(self, hello: P.Hello, kind: P.HandleKind) -> str:
        if hello.version != P.CHANNEL_VERSION:
            return f"channel version {hello.version}, producer speaks {P.CHANNEL_VERSION}"
        if hello.host != self.host:
            return "consumer is on another host (handles are local): use the tier"
        if kind not in hello.accept:
            return f"producer offers {kind} handles, consumer accepts {hello.accept}"
        return ""

    def _lease(self, keys: Sequence[bytes]) -> tuple[list[P.Item], list[bytes]]:
        """Items for the leading run of ``keys`` held, leased against eviction."""
        until = time.monotonic() + self.lease_s
        items, got = [], []
        with self._lock:
            for k in keys:
                e = self._box.get(k)
                if e is None:
                    break
                e.leased_until = until
                self._box.move_to_end(k)
                items.append(e.exp.item)
                got.append(k)
        self.served_chunks += len(items)
        return items, got

    def _unlease(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for k in keys:
                e = self._box.get(k)
                if e is not None:
                    e.leased_until = 0.0
            self._evict()

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):  # already gone: nothing to clean
                os.unlink(self.path)
        with self._lock:
            for c in self._conns:  # consumers see the producer go: their next fetch falls back
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    log.debug("channel: consumer connection already closed")
            for e in self._box.values():
                e.exp.close()
            self._box.clear()
            self._bytes = 0

    def __enter__(self) -> ChannelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelClient:
    """The consumer's end. ``accept``: handle kinds it maps (default CUDA only: a host handle
    would be the tier path's host hop anyway)."""

    def __init__(
        self,
        path: str,
        device: torch.device | str,
        *,
        timeout_s: float = 2.0,
        retry_s: float = 5.0,
        accept: Sequence[str] = ("cuda",),
    ) -> None:
        self.path = path
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.accept: list[P.HandleKind] = [k for k in ("cuda", "shm") if k in accept]
        self.stats = ChannelStats()
        self._sock: socket.socket | None = None
        self._down_until = 0.0
        self._req = 0
        self._lock = threading.Lock()

    def _connect(self) -> str:
        """ "" when connected; else why not (and the channel rests ``retry_s``)."""
        if self._sock is not None:
            return ""
        if time.monotonic() < self._down_until:
            return "resting"
        if self.device.type != "cuda" and "shm" not in self.accept:
            return "not-cuda"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.path)
            P.send(s, P.Hello(P.CHANNEL_VERSION, host_id(), device_name(self.device), list(self.accept)))
            reply = P.recv(s)
        except (OSError, P.ChannelProtocolError) as e:
            s.close()
            log.info("kvtier channel: producer at %s unreachable (%s): using the tier path", self.path, e)
            return self._rest("unreachable")
        if isinstance(reply, P.Refuse):
            s.close()
            log.info("kvtier channel: producer refused: %s; using the tier path", reply.reason)
            return self._rest("refused")
        if not isinstance(reply, P.Hello):
            s.close()
            return self._rest("unreachable")
        self._sock = s
        return ""

    def _rest(self, reason: str) -> str:
        self._down_until = time.monotonic() + self.retry_s
        return reason

    def _drop(self, reason: str) -> str:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return self._rest(reason)

    def fetch(self, keys: Sequence[bytes], consume: Callable[[int, torch.Tensor], None]) -> int:
        """Deliver the leading chunks of ``keys`` the producer holds: ``consume(i, kv)`` is called
        for chunk ``i`` with the producer's tensor mapped here (valid only during the call: copy
        it). Returns how many leading chunks were delivered (0: take them from the tiers)."""
        with self._lock:
            self.stats.fetches += 1
            n, reason = self._fetch(keys, consume)
            if n < len(keys):
                self.stats.fallbacks[reason or "not-held"] += 1
            return n

    def _fetch(self, keys: Sequence[bytes], consume: Callable[[int, torch.Tensor], None]) -> tuple[int, str]:
        if not keys:
            return 0, ""
        why = self._connect()
        if why:
            return 0, why
        assert self._sock is not None
        self._req += 1
        req = self._req
        try:
            P.send(self._sock, P.Fetch(req, list(keys[: P.MAX_KEYS])))
            offer = P.recv(self._sock)
        except (OSError, P.ChannelProtocolError):
            return 0, self._drop("unreachable")
        if not isinstance(offer, P.Offer) or offer.req != req:
            return 0, self._drop("unreachable")
        n, why = 0, ""
        # NOTE: every CUDA mapping of one fetch stays open until its copies are done: views of one
        # producer buffer share a CUDA IPC handle, which torch then opens once, not per chunk.
        mapped: list[Mapped] = []
        try:
            for i, item in enumerate(offer.items):
                if item.key != keys[i]:
                    why = "bad-offer"
                    break
                try:
                    m = map_item(item)
                except (RuntimeError, OSError, ValueError) as e:  # no peer access, gone, inconsistent
                    log.info("kvtier channel: cannot map the producer's chunk (%s): using the tier path", e)
                    why = "map-failed"
                    break
                mapped.append(m)
                consume(i, m.tensor)
                self.stats.bytes += m.tensor.numel() * m.tensor.element_size()
                n += 1
                if not m.tensor.is_cuda:  # a host block is one fd each: unmapped at once
                    m.close()
            if self.device.type == "cuda" and n:
                torch.cuda.current_stream(self.device).synchronize()  # copies done before Done frees them
        finally:
            for m in mapped:
                m.close()
        try:
            P.send(self._sock, P.Done(req))
        except OSError:
            self._drop("unreachable")
        self.stats.chunks += n
        return n, why

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


# -- the producer's and consumer's halves over a CacheEngine --------------------------------------
def send_kv(
    engine: CacheEngine,
    server: ChannelServer | None,
    tokens: TokenInput,
    kv: torch.Tensor,
    *,
    extras: KeyExtras | None = None,
) -> int:
    """Offer every full chunk of ``tokens`` (``kv``: ``[L, 2, len(tokens), H, D]``) on the channel
    and store it in the tiers (for reuse, and for consumers the channel cannot reach). Returns
    the tokens offered. The offered views share ``kv``'s memory: do not write it afterwards."""
    arr = tokens_to_array(tokens)
    keys = [k for k in engine.keys(arr, extras) if k.num_tokens == engine.chunk_tokens]
    offered = 0
    if server is not None:
        for k in keys:
            if server.offer(k.digest, kv[:, :, k.start : k.end]):
                offered += k.num_tokens
    engine.store(arr, kv, extras=extras)
    return offered


@dataclass
class Received:
    channel_tokens: int
    tier_tokens: int

    @property
    def tokens(self) -> int:
        return self.channel_tokens + self.tier_tokens


def receive_kv(
    engine: CacheEngine,
    client: ChannelClient | None,
    tokens: TokenInput,
    out: torch.Tensor,
    *,
    extras: KeyExtras | None = None,
) -> Received:
    """Fill ``out[:, :, :n]`` with the KV of the longest prefix of ``tokens`` held by the producer's
    channel and then the tiers; ``n`` is ``Received.tokens`` (a chunk prefix: a hole ends it)."""
    arr = tokens_to_array(tokens)
    keys = [k for k in engine.keys(arr, extras) if k.num_tokens == engine.chunk_tokens]
    via = 0
    if client is not None and keys:

        def put(i: int, kv: torch.Tensor) -> None:
            k = keys[i]
            out[:, :, k.start : k.end].copy_(kv, non_blocking=out.device.type == "cuda")

        via = client.fetch([k.digest for k in keys], put)
    start = keys[via - 1].end if via else 0
    tier_end = start
    if start < arr.size:
        with engine.retrieve_chunks(arr, start=start, extras=extras) as views:
            for k, chunk in views.chunks:
                out[:, :, k.start : k.end].copy_(chunk.kv, non_blocking=out.device.type == "cuda")
                tier_end = k.end
            if out.device.type == "cuda" and views.chunks:
                torch.cuda.current_stream(out.device).synchronize()  # chunks pinned until copied
    return Received(start, tier_end - start)
