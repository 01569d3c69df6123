"""The daemon's request handlers: protocol messages in, tier operations out. No sockets here.

``CacheService`` owns the TierManager (a ``SharedCPUTier`` on top, then the disk/remote tiers
``build_tiers`` makes from the config) and one ``Session`` per connected client holding that
client's leases (chunks it is reading in place) and reservations (space it is writing).

Invariants:
* Every handler is safe to run on a worker thread; a session's requests arrive one at a time
  (the connection reads the next frame only after answering), different sessions in parallel.
* A session's leases and reservations are given back when it ends (``end_session``) or, for a
  live but stuck client, when they pass ``lease_timeout_s`` (``reap``): a dead client leaves
  nothing pinned or reserved behind.
* Validation happens before any tier is touched: a bad item is a ``ProtocolError`` reply.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import mmap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvtier.chunk import Chunk, dtype_from_name
from kvtier.config import Config
from kvtier.errors import KVTierError
from kvtier.memory import _align
from kvtier.server.budget import PayloadBudget
from kvtier.server.metrics import DaemonMetrics
from kvtier.server.pool_tier import Reservation, SharedCPUTier
from kvtier.server.sink import PutSink
from kvtier.storage import TierManager
from kvtier.tiers.base import Tier
from kvtier.tiers.factory import build_tiers
from kvtier.wire import protocol as P
from kvtier.wire.shm import SharedSegment, as_bytes, bytes_view, reap_stale_segments

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | mmap.mmap | PutSink
"""A request's payload: what the connection received (see ``server/conn.py``), or for a
``Put`` the pool space it was received into (``sink_put``)."""

Reply = tuple[P.Message, list[memoryview], list[Callable[[], None]]]
"""A reply header, payload parts to send after it, and callbacks to run once they are sent."""


@dataclass
class Session:
    id: int
    client: str = ""
    leases: dict[int, tuple[Chunk, float]] = field(default_factory=dict)
    reservations: dict[int, tuple[Reservation, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class ServerCounters:
    connections: int = 0
    active_sessions: int = 0
    requests: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    lookups: int = 0
    lookup_keys: int = 0
    hit_keys: int = 0
    hit_lookups: int = 0  # lookups that found at least one chunk: the request hit count
    get_hits: int = 0
    get_misses: int = 0
    puts: int = 0
    sunk_puts: int = 0  # socket puts received straight into pool space (server/sink.py)
    shm_bytes_in: int = 0
    shm_bytes_out: int = 0
    socket_bytes_in: int = 0
    socket_bytes_out: int = 0
    leases_reaped: int = 0
    reservations_reaped: int = 0


def lower_tiers(config: Config) -> list[Tier]:
    """The disk/remote tiers of ``config`` (the CPU tier is the daemon's own shared one)."""
    if not (config.disk.enabled or config.remote.url):
        return []
    cfg = dataclasses.replace(config, cpu=dataclasses.replace(config.cpu, enabled=False))
    return build_tiers(cfg)


class CacheService:
    """Tier operations for the daemon's clients."""

    def __init__(
        self,
        config: Config,
        *,
        shm_dir: str = "/dev/shm",
        max_payload_bytes: int = P.DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        for p in reap_stale_segments(shm_dir):
            log.info("removed a stale pool segment of a dead daemon: %s", p)
        self.config = config
        self.segment = SharedSegment.create(shm_dir, _align(config.cpu.max_bytes))
        self.cpu = SharedCPUTier(
            self.segment, policy=config.cpu.eviction_policy, pin_timeout_s=config.cpu.pin_timeout_s
        )
        try:
            self.manager = TierManager([self.cpu, *lower_tiers(config)], config.storage)
        except BaseException:
            self.cpu.close()
            raise
        self.lease_timeout_s = config.cpu.pin_timeout_s
        self.max_payload_bytes = max_payload_bytes
        self.counters = ServerCounters()
        self.budget: PayloadBudget | None = None
        """The daemon's payload budget, reported in ``stats()`` (set by the daemon)."""
        self.metrics = DaemonMetrics(self)
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.started = time.time()

    # -- sessions ---------------------------------------------------------------------------------
    def new_session(self, client: str) -> Session:
        with self._lock:
            s = Session(next(self._ids), client)
            self.sessions[s.id] = s
            self.counters.connections += 1
            self.counters.active_sessions = len(self.sessions)
            return s

    def end_session(self, s: Session) -> None:
        """Give back everything the session holds (its client disconnected or died)."""
        with self._lock:
            self.sessions.pop(s.id, None)
            self.counters.active_sessions = len(self.sessions)
        with s.lock:
            for chunk, _ in s.leases.values():
                chunk.release()
            for r, _ in s.reservations.values():
                self.cpu.abort(r)
            s.leases.clear()
            s.reservations.clear()

    def reap(self, now: float | None = None) -> None:
        """Drop leases and reservations older than ``lease_timeout_s`` (a stuck client's)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            with s.lock:
                for lid in [i for i, (_, d) in s.leases.items() if d <= now]:
                    del s.leases[lid]  # the pool's pin has lapsed by itself; do not unpin twice
                    self.counters.leases_reaped += 1
                for rid in [i for i, (_, d) in s.reservations.items() if d <= now]:
                    self.cpu.abort(s.reservations.pop(rid)[0])
                    self.counters.reservations_reaped += 1

    # -- dispatch ---------------------------------------------------------------------------------
    def prefix_lookup(self, keys: Sequence[bytes]) -> int:
        """Leading ``keys`` cached, counted as one lookup (socket ``Prefix`` and HTTP ``/lookup``)."""
        n = self.manager.prefix_lookup(keys)
        c = self.counters
        c.lookups += 1
        c.lookup_keys += len(keys)
        c.hit_keys += n
        c.hit_lookups += n > 0
        return n

    def handle(self, s: Session, msg: P.Message, payload: Buffer | None) -> Reply:
        """Answer one request; raises ``ProtocolError`` for a request that is invalid."""
        self.counters.requests += 1
        t0 = time.perf_counter()
        try:
            return self._dispatch(s, msg, payload)
        finally:
            self.metrics.request_seconds.labels(type(msg).__name__.lower()).observe(time.perf_counter() - t0)

    def _dispatch(self, s: Session, msg: P.Message, payload: Buffer | None) -> Reply:
        if isinstance(msg, P.Prefix):
            return P.Count(self.prefix_lookup(msg.keys)), [], []
        if isinstance(msg, P.Contains):
            return P.Bools([self.manager.prefix_lookup([k]) == 1 for k in msg.keys]), [], []
        if isinstance(msg, P.Get):
            return self._get(s, msg)
        if isinstance(msg, P.Reserve):
            return self._reserve(s, msg), [], []
        if isinstance(msg, P.Commit):
            return self._commit(s, msg), [], []
        if isinstance(msg, P.Put):
            if isinstance(payload, PutSink):
                return self._put_sunk(payload), [], []
            return self._put(msg, payload or b""), [], []
        if isinstance(msg, P.Remove):
            return P.Count(sum(self.manager.remove(k) for k in msg.keys)), [], []
        if isinstance(msg, P.Clear):
            self.cpu.clear()
            return P.Count(0), [], []
        if isinstance(msg, P.Flush):  # every session's queued writes, not only this one's
            return P.Flushed(self.manager.flush(msg.timeout_s)), [], []
        if isinstance(msg, P.Stats):
            return P.StatsReply(self.stats()), [], []
        if isinstance(msg, P.Ping):
            return P.Pong(), [], []
        raise P.ProtocolError(f"unexpected message {type(msg).__name__} after the handshake")

    def release(self, s: Session, leases: list[int]) -> None:
        with s.lock:
            for lid in leases:
                held = s.leases.pop(lid, None)
                if held is not None:
                    held[0].release()

    # -- handlers ---------------------------------------------------------------------------------
    def _get(self, s: Session, msg: P.Get) -> Reply:
        items: list[P.GotItem | None] = []
        parts: list[memoryview] = []
        after: list[Callable[[], None]] = []
        inline = 0
        deadline = time.monotonic() + self.lease_timeout_s
        for key in msg.keys:
            chunk = self.manager.get(key)
            if chunk is None:
                items.append(None)
                self.counters.get_misses += 1
                continue
            kv = chunk.kv
            meta = P.ItemMeta(chunk.fingerprint, chunk.num_tokens, list(kv.shape), str(kv.dtype)[6:])
            nbytes = chunk.nbytes
            off = self.segment.offset_of(kv) if msg.shm else None
            if off is not None:
                lid = next(self._ids)
                with s.lock:
                    s.leases[lid] = (chunk, deadline)
                items.append(P.GotItem(meta, "shm", off, nbytes, lid))
                self.counters.shm_bytes_out += nbytes
            elif inline + nbytes <= self.max_payload_bytes:
                parts.append(bytes_view(kv))
                after.append(chunk.release)
                items.append(P.GotItem(meta, "inline", inline, nbytes))
                inline += nbytes
                self.counters.socket_bytes_out += nbytes
            else:  # the reply is full: a miss for this one, the client asks again
                chunk.release()
                items.append(None)
                continue
            self.counters.get_hits += 1
        return P.GetReply(items), parts, after

    def _new_reservation(self, item: P.PutItem) -> Reservation | bool:
        """Pool space for ``item``, whose meta the caller has already checked (``P.check_meta``)."""
        dtype = dtype_from_name(item.meta.dtype)
        return self.cpu.reserve(
            item.key, tuple(item.meta.shape), dtype, item.meta.fingerprint, item.meta.num_tokens
        )

    def _reserve(self, s: Session, msg: P.Reserve) -> P.Reserved:
        for item in msg.items:  # validate all before reserving any
            P.check_meta(item.meta, self.max_payload_bytes)
        slots = []
        deadline = time.monotonic() + self.lease_timeout_s
        for item in msg.items:
            r = self._new_reservation(item)
            if isinstance(r, bool):
                slots.append(P.Slot("exists" if r else "full"))
                continue
            rid = next(self._ids)
            with s.lock:
                s.reservations[rid] = (r, deadline)
            slots.append(P.Slot("ok", r.obj.offset, rid))
        return P.Reserved(slots)

    def _commit(self, s: Session, msg: P.Commit) -> P.Bools:
        out = []
        for rid in msg.reservations:
            with s.lock:
                held = s.reservations.pop(rid, None)
            if held is None:  # unknown or reaped: the client must not assume it was stored
                out.append(False)
                continue
            out.append(self._publish(held[0]))
            self.counters.shm_bytes_in += held[0].obj.nbytes
        return P.Bools(out)

    def sink_put(self, msg: P.Message, plen: int) -> PutSink | None:
        """Pool space to receive a ``Put``'s ``plen``-byte payload into (``server/sink.py``), or
        ``None`` for the buffered path: not a ``Put``, an item the handler would refuse, items
        that do not tile the payload in order, or any item without a reservation (stored
        already, no room). Runs on the loop when the header arrives; never raises."""
        if not isinstance(msg, P.Put) or not msg.items:
            return None
        try:
            sizes = [P.check_meta(it.meta, self.max_payload_bytes) for it in msg.items]
        except P.ProtocolError:
            return None
        end = 0
        for it, n in zip(msg.items, sizes):
            if it.payload_offset != end:
                return None
            end += n
        if end != plen:
            return None
        held: list[Reservation] = []
        for it in msg.items:
            try:
                r = self._new_reservation(it)
            except KVTierError:  # closing, or a dtype check_meta let through: the handler says
                r = False
            if isinstance(r, bool):
                for x in held:
                    self.cpu.abort(x)
                return None
            held.append(r)
        views = [bytes_view(r.obj.tensor).cast("B") for r in held]  # pool tensors are contiguous
        return PutSink(held, views, self.cpu.abort)

    def _put_sunk(self, sink: PutSink) -> P.Bools:
        """A ``Put`` whose chunks arrived in their reservations: publish them (every byte is
        there: the connection hands over only complete frames)."""
        self.counters.sunk_puts += 1
        out = []
        for i in range(len(sink.reservations)):
            r = sink.take(i)
            out.append(self._publish(r))
            self.counters.socket_bytes_in += r.obj.nbytes
        return P.Bools(out)

    def _put(self, msg: P.Put, payload: bytes | bytearray | mmap.mmap) -> P.Bools:
        sizes = [P.check_meta(it.meta, self.max_payload_bytes) for it in msg.items]
        for it, n in zip(msg.items, sizes):
            if it.payload_offset + n > len(payload):
                raise P.ProtocolError(
                    f"item at payload offset {it.payload_offset} of {n} bytes overruns the {len(payload)}-byte payload"
                )
        src = np.frombuffer(payload, dtype=np.uint8)  # read-only view, no copy
        out = []
        for it, n in zip(msg.items, sizes):
            r = self._new_reservation(it)
            if isinstance(r, bool):
                out.append(r)
                continue
            np.copyto(as_bytes(r.obj.tensor).numpy(), src[it.payload_offset : it.payload_offset + n])
            out.append(self._publish(r))
            self.counters.socket_bytes_in += n
        return P.Bools(out)

    def _publish(self, r: Reservation) -> bool:
        """Make a written reservation visible, then hand it to the lower tiers."""
        ok = self.cpu.commit(r)
        self.counters.puts += ok
        if ok and len(self.manager.tiers) > 1:
            chunk = self.cpu.pinned(r.key)  # held while the lower tiers copy it
            if chunk is not None:
                with chunk:
                    self.manager.put_below(r.key, chunk)
        return ok

    # -- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {"server": dict(vars(self.counters))}
        out["server"]["uptime_s"] = time.time() - self.started
        with self._lock:
            sessions = list(self.sessions.values())
        out["server"]["leases_held"] = sum(len(s.leases) for s in sessions)
        out["server"]["reservations_held"] = sum(len(s.reservations) for s in sessions)
        if self.budget is not None:  # read from another thread: a snapshot, maybe a moment old
            out["server"]["inflight_bytes"] = self.budget.used
            out["server"]["inflight_peak_bytes"] = self.budget.peak
            out["server"]["inflight_waits"] = self.budget.waits
        for name, t in self.manager.stats().items():
            out[f"tier:{name}"] = {k: v for k, v in vars(t).items() if k != "name"}
        return out

    def close(self) -> None:
        with self._lock:
            sessions = list(self.sessions.values())
        for s in sessions:
            self.end_session(s)
        self.manager.flush()
        self.manager.close()
