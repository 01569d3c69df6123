"""TierManager: makes an ordered list of tiers (fastest first) act as one store.

* ``prefix_lookup`` finds the longest run of leading keys present in the union of the tiers.
* ``get`` asks tiers top-down; a hit in a lower tier is copied up to the top tier
  (``promote_on_hit``), so the next request for it is served from RAM.
* ``put`` writes the top tier synchronously. Lower tiers are written asynchronously, each by its
  own worker thread from its own bounded queue (a slow remote never holds up the disk):
  ``write_through`` (default) queues every put; ``write_back`` writes lower tiers only when the
  top tier evicts a chunk (``CPUTier.on_evict_chunk``) and, at ``close()``, what is left in it. The eviction hook runs
  under the CPU tier's lock and copies the chunk there; with a full queue it waits (see below)
  while holding that lock, which is the backpressure write-back puts on stores.
* ``prefetch(keys)`` loads the cached prefix of ``keys`` from slower tiers into the top tier in
  the background; a ``get`` of a key being prefetched waits for it instead of reading it twice.
* Single-flight loads: concurrent ``get``s of one key missing from the top tier make one read
  of the lower tiers; the others wait for it and read the promoted copy (``get`` says how).
* Read cost: every timed read that returns data feeds the tier's ``CostEstimate`` (latency per
  call, seconds per byte; writes are the prior until the first read); ``read_fit`` gives it to
  the engine, which weighs it against recomputing (``CacheEngine.lookup_by_cost``), and
  ``prefix_locate`` can leave out tiers it has found too slow to be worth asking.
* ``flush(timeout_s)`` waits for the queues and makes every tier durable (``DiskTier.sync``;
  ``RemoteTier.sync`` asks the daemon to do the same).

Backpressure: a full queue *blocks* the caller for up to ``queue_timeout_s``, then drops that
chunk for that tier and counts it (``TierStats.queue_drops``). Blocking first, because
write-through promises the lower tiers every chunk and, under sustained load, a bounded wait
makes stores track the slowest tier's speed instead of silently losing an arbitrary subset;
bounded, because a stalled tier must not stall inference. ``queue_full="drop"`` never waits.

Why the queued write owns a copy of the chunk: the caller's tensor may be reused as soon as
``put`` returns, and a view into the top tier's pool can be evicted/reused while queued (a pin
lapses after its timeout) — a write from either could store different bytes under the key. The
copy is taken once on the host (a GPU tensor is copied to host once and that copy feeds the top
tier too), and memory is bounded by ``max_queue_chunks`` per lower tier.

Invariants:
* A failing tier is a miss, never an error to the caller: exceptions a tier raises at run time
  (``OSError``, ``ConnectionError``, ``TimeoutError``) are counted and logged, and the next tier
  is asked. Worker threads survive any failure of a tier.
* ``prefix_lookup`` never reports a key as present unless some tier's ``contains`` said so, and
  stops at the first key no tier has (a hole ends the prefix).
* ``remove(key)`` wins over writes of ``key`` still queued: they are skipped (or undone).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from kvtier.chunk import Chunk
from kvtier.config import StorageConfig
from kvtier.errors import KVTierError
from kvtier.threads import one_omp_thread
from kvtier.tiers.base import Tier, TierClosedError, TierError, TierStats
from kvtier.tiers.cpu import CPUTier, Reservation
from kvtier.tiers.speed import CostEstimate, Ewma, Fit

log = logging.getLogger(__name__)

SOFT_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError)
"""Run-time failures of a tier that degrade to a miss (``ConnectionError``/``TimeoutError`` are
``OSError`` subclasses; listed for the reader)."""

PREFETCH_BATCH = 4  # keys per batched_get: enough reads in flight, and early chunks land early
READ_AHEAD = 3
"""Lower-tier chunks ``iter_prefix`` keeps in flight ahead of its consumer (``TierManager.read_ahead``).
With ``CacheEngine.retrieve``'s three held chunks, 3 + 3 fit the disk tier's default read pool
(eight 32 MiB buffers); more reads in flight also take more cores (a reader and a hasher each)."""
READ_AHEAD_THREADS = 16
"""Threads of the shared read-ahead pool: concurrent retrieves each get ``read_ahead`` reads."""
PREFETCH_WAIT_S = 10.0
"""How long a ``get`` waits for a prefetch already loading its key. Reading the key itself
instead would queue behind the prefetch on the same slow tier and double its traffic, so the
wait is generous; it is bounded so a hung tier cannot hold a request forever."""


@dataclass
class _Job:
    key: bytes
    chunk: Chunk  # owned by the job: a private host copy
    seq: int


@dataclass
class _Load:
    """One single-flight read of a key from the lower tiers (see ``TierManager.get``)."""

    done: threading.Event = field(default_factory=threading.Event)
    found: bool | None = None  # None: the leader failed before it knew
    promoted: bool = False


@dataclass
class _TierIO:
    """What the manager measures of each tier's calls (merged into ``TierStats``)."""

    read_bytes: int = 0
    written_bytes: int = 0
    get_seconds: float = 0.0
    put_seconds: float = 0.0
    promotions: int = 0
    queue_drops: int = 0
    read_cost: CostEstimate = field(default_factory=CostEstimate, repr=False)  # s vs bytes, per call
    write_cost: CostEstimate = field(default_factory=CostEstimate, repr=False)  # prior until a read
    lookup_s: Ewma = field(default_factory=Ewma, repr=False)  # one prefix_contains round trip
    last_read: float = 0.0  # time.monotonic() of the last measured read (0: never)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TierManager:
    """Ordered tiers, top (fastest) first; see the module docstring for the write/read rules."""

    def __init__(self, tiers: Sequence[Tier], config: StorageConfig | None = None) -> None:
        if not tiers:
            raise TierError("TierManager needs at least one tier")
        cfg = config or StorageConfig()
        self.config = cfg
        self.tiers = list(tiers)
        self.top = self.tiers[0]
        self.errors = 0
        self._write_back = cfg.write_mode == "write_back" and len(self.tiers) > 1
        hooks = self.top.evict_hooks
        if self._write_back and hooks is None:
            raise TierError(f"write_back needs a top tier with eviction hooks, {self.top.name} has none")
        self._io = [_TierIO() for _ in self.tiers]
        self._cv = threading.Condition()
        self._pending = 0  # queued or running writes, over all lower tiers
        self._pending_keys: dict[bytes, int] = {}
        self._tombstones: dict[bytes, int] = {}  # key -> seq: skip queued writes up to seq
        self._seq = 0
        self._clean: set[bytes] = set()  # in the top tier *and* already below (promoted/prefetched)
        self._inflight: dict[bytes, threading.Event] = {}  # keys a prefetch is loading
        self._loading: dict[bytes, _Load] = {}  # keys a get is reading from below (single-flight)
        self._closed = False
        self._last_drop_log = -1.0
        self._queues: dict[int, queue.Queue[_Job | None]] = {}
        self._workers: list[threading.Thread] = []
        for i in range(1, len(self.tiers)):
            self._queues[i] = queue.Queue(cfg.max_queue_chunks)
            t = threading.Thread(
                target=self._write_loop, args=(i,), daemon=True, name=f"kvtier-write-{self.tiers[i].name}"
            )
            t.start()
            self._workers.append(t)
        self._prefetcher = ThreadPoolExecutor(
            cfg.prefetch_threads, thread_name_prefix="kvtier-prefetch", initializer=one_omp_thread
        )
        self.read_ahead = READ_AHEAD
        """Lower-tier reads ``iter_prefix`` keeps in flight (0: one at a time, in the caller's thread)."""
        self._reader = ThreadPoolExecutor(
            READ_AHEAD_THREADS, thread_name_prefix="kvtier-read", initializer=one_omp_thread
        )
        if self._write_back and hooks is not None:
            hooks.append(self._on_top_evict)

    # -- lookup and read --------------------------------------------------------------------------
    def prefix_lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` present in some tier (see ``prefix_locate``)."""
        return len(self.prefix_locate(keys))

    def prefix_locate(self, keys: Sequence[bytes], tiers: Sequence[int] | None = None) -> list[int]:
        """For each leading key present in some tier, the index of the first tier found holding it.

        Only the tier indices in ``tiers`` are asked (default: all, in order). Chunks of one
        prefix may be spread over tiers (early ones promoted to CPU, later ones only on disk), so
        each round asks the tiers top-down for the longest run from the current position and
        restarts from the top after any progress.
        """
        order = range(len(self.tiers)) if tiers is None else sorted(set(tiers))
        where: list[int] = []
        keys = list(keys)
        progress = True
        while progress and len(where) < len(keys):
            progress = False
            for i in order:
                tier = self.tiers[i]
                t0 = time.perf_counter()
                try:
                    found = tier.prefix_contains(keys[len(where) :])
                except SOFT_ERRORS as e:
                    self._soft_fail(tier, "lookup", e)
                    continue
                finally:
                    self._io[i].lookup_s.observe(time.perf_counter() - t0)
                if found:
                    where += [i] * found
                    progress = True
                    break
        return where

    def lookup_seconds(self, i: int) -> float | None:
        """Tier ``i``'s measured lookup round trip (EWMA; ``None`` before its first lookup)."""
        return self._io[i].lookup_s.value

    def read_fit(self, i: int) -> tuple[Fit | None, float]:
        """Tier ``i``'s read cost line (for a lower tier, its write cost line before the first
        measured read; ``None`` if not measured) and the seconds since its last measured read
        (``inf`` if never). The top tier's writes are no prior: a CPU tier reads by view (no
        copy) but writes by copy, so its writes would overstate its reads many times over."""
        io = self._io[i]
        lat = io.lookup_s.value  # a read's latency where reads of one size cannot separate it
        fit = io.read_cost.fit(lat) or (io.write_cost.fit(lat) if i else None)
        age = time.monotonic() - io.last_read if io.last_read else float("inf")
        return fit, age

    def top_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` the top tier holds (0 if it fails: those chunks are then
        simply offered to the tiers again, and a tier stores a key it already has only once)."""
        try:
            return self.top.prefix_contains(list(keys))
        except SOFT_ERRORS as e:
            self._soft_fail(self.top, "lookup", e)
            return 0

    def get(self, key: bytes) -> Chunk | None:
        """The chunk from the fastest tier that has it (promoted to the top), or ``None``.

        Single-flight: of concurrent ``get``s of a key the top tier lacks, one (the leader) reads
        the lower tiers and promotes; the others wait for it and then read the top tier. So N
        requests sharing a prefix that fell out of RAM cost one disk/remote read per chunk, not N.
        A waiter reads below itself only if the leader's copy did not reach the top (top full,
        ``promote_on_hit`` off); it waits no longer than the leader's read, which each tier bounds.
        """
        ev = self._inflight.get(key)
        if ev is not None:  # a prefetch is loading it into the top tier: wait rather than read twice
            ev.wait(PREFETCH_WAIT_S)
        c = self._get_from(0, key)
        if c is not None or len(self.tiers) == 1:
            return c
        with self._cv:
            load = self._loading.get(key)
            leader = load is None
            if load is None:
                load = self._loading[key] = _Load()
        if not leader:
            load.done.wait(PREFETCH_WAIT_S)
            if load.found is False:  # the leader asked every tier just now: a miss for us too
                return None
            c = self._get_from(0, key) if load.promoted else None
            return c if c is not None else self._get_below(key)[0]
        try:
            c, load.promoted = self._get_below(key)
            load.found = c is not None
            return c
        finally:
            with self._cv:
                self._loading.pop(key, None)
            load.done.set()

    def _get_below(self, key: bytes) -> tuple[Chunk | None, bool]:
        """The chunk from the first lower tier that has it, and whether it was promoted to the top."""
        for i in range(1, len(self.tiers)):
            c = self._get_from(i, key)
            if c is not None:
                return c, self.config.promote_on_hit and self._promote(i, key, c)
        return None, False

    def get_prefix(self, keys: Sequence[bytes]) -> list[Chunk]:
        """Chunks for the leading ``keys``, stopping at the first one no tier returns.

        The top tier is asked for all keys in one batched call (one round trip for a remote
        top tier such as the daemon); a key it misses falls through ``get`` to the lower tiers.
        Chunks after a hole are released, so no pin outlives the call except the returned ones.
        """
        return list(self.iter_prefix(keys))

    def iter_prefix(
        self, keys: Sequence[bytes], into: Sequence[torch.Tensor | None] | None = None
    ) -> Generator[Chunk, None, None]:
        """``get_prefix`` lazily: the top tier's chunks come from one batched call up front; the
        keys it misses are read from the lower tiers ``read_ahead`` at a time (``get`` on the
        read-ahead pool's threads), yielded in key order.

        Why read ahead: one lower-tier read at a time left the disk -> GPU retrieve at 0.76x of
        a raw read + H2D on the H200 (each chunk's read, hash tail and hand-offs in series; a
        single read-ahead thread did not help either, still one read at a time). With several
        reads in flight, each of its own file in file order (the kernel's readahead per file
        still works on a cold file), reads and checksums of different chunks overlap.

        Invariants: a chunk is yielded only after ``get`` returned it, i.e. after its tier
        verified it (the disk tier's checksum); a read that fails (a miss, corrupt, unreadable)
        ends the prefix there and every chunk read ahead past it is released, as are all still
        unconsumed when the consumer closes the generator: it returns only once every read it
        started has finished and its chunk was released, so no buffer outlives it. A consumer
        that releases each chunk once copied (``CacheEngine.retrieve``) holds at most its own
        chunks plus ``read_ahead`` of a lower tier's read buffers however long the prefix, so a
        disk tier's recycled pool is not exhausted and no read falls back to a fresh pageable
        tensor. ``read_ahead = 0`` is the old one-at-a-time path (read in the consumer's thread).
        ``into``: destinations for the top tier's batched call (``Tier.batched_get_into``; a chunk
        received there *is* ``into[i]``).
        """
        if not keys:
            return
        # while a prefetch is loading keys, go key by key: ``get`` waits for the in-flight ones
        first = None if self._inflight else self._batched_get_from(0, list(keys), into)
        if first is None:
            first = [None] * len(keys)
        ahead: dict[int, Future[Chunk | None]] = {}
        nxt = 0  # next key index to consider for read-ahead
        try:
            for j, key in enumerate(keys):
                c, first[j] = first[j], None
                if c is None:
                    nxt = max(nxt, j)  # this key and up to ``read_ahead`` more missing ones in flight
                    while self.read_ahead > 0 and nxt < len(keys) and len(ahead) <= self.read_ahead:
                        if first[nxt] is None:
                            ahead[nxt] = self._read_lower(keys[nxt])
                        nxt += 1
                    fut = ahead.pop(j, None)
                    c = fut.result() if fut is not None else self.get(key)
                if c is None:
                    break
                yield c
        finally:
            self._drop_read_ahead(ahead)
            for rest in first:
                if rest is not None:
                    rest.release()

    def _read_lower(self, key: bytes) -> Future[Chunk | None]:
        """``get(key)`` on the read-ahead pool, or here when the pool is shut down (closing)."""
        try:
            return self._reader.submit(self.get, key)
        except RuntimeError:
            f: Future[Chunk | None] = Future()
            f.set_result(self.get(key))  # its error (if any) reaches the consumer, as before
            return f

    def _drop_read_ahead(self, ahead: dict[int, Future[Chunk | None]]) -> None:
        """Wait for reads no one will consume and release their chunks (cancelled if not begun)."""
        for fut in ahead.values():
            fut.cancel()
        wait(list(ahead.values()))
        for fut in ahead.values():
            if fut.cancelled():
                continue
            try:
                c = fut.result()
            except KVTierError as e:  # a read past the end of what the consumer wanted
                log.debug("read-ahead of an unconsumed chunk failed: %s", e)
                continue
            if c is not None:
                c.release()

    def _get_from(self, i: int, key: bytes) -> Chunk | None:
        tier = self.tiers[i]
        t0 = time.perf_counter()
        try:
            c = tier.get(key)
        except SOFT_ERRORS as e:
            self._soft_fail(tier, "get", e)
            c = None
        self._record_read(i, t0, [c])
        return c

    def _batched_get_from(
        self, i: int, keys: list[bytes], into: Sequence[torch.Tensor | None] | None = None
    ) -> list[Chunk | None] | None:
        """Tier ``i``'s ``batched_get`` of ``keys`` (``batched_get_into`` given ``into``), timed
        and counted; ``None`` if the tier failed."""
        tier = self.tiers[i]
        t0 = time.perf_counter()
        try:
            got = tier.batched_get(keys) if into is None else tier.batched_get_into(keys, into)
        except SOFT_ERRORS as e:
            self._soft_fail(tier, "batched_get", e)
            return None
        self._record_read(i, t0, got)
        return got

    def _record_read(self, i: int, t0: float, chunks: Sequence[Chunk | None]) -> None:
        dt = time.perf_counter() - t0
        nbytes = sum(c.nbytes for c in chunks if c is not None)
        io = self._io[i]
        with io.lock:
            io.get_seconds += dt
            io.read_bytes += nbytes
            if nbytes:  # a miss says nothing about bandwidth
                io.last_read = time.monotonic()
        io.read_cost.observe(nbytes, dt)

    def _promote(self, i: int, key: bytes, c: Chunk) -> bool:
        if self._put_to(0, key, c):
            if self._write_back:  # only write-back asks "is it already below?" (on eviction)
                with self._cv:
                    self._clean.add(key)
            with self._io[i].lock:
                self._io[i].promotions += 1
            return True
        return False

    # -- write ------------------------------------------------------------------------------------
    def put(self, key: bytes, chunk: Chunk) -> bool:
        """Store in the top tier now and queue the lower tiers; ``True`` if any took it."""
        if self._closed:
            raise TierClosedError("TierManager is closed")
        lower = len(self.tiers) > 1
        private = lower and chunk.kv.device.type != "cpu"
        if private:  # one device->host copy feeds every tier
            chunk = Chunk(_host_copy(chunk.kv), chunk.fingerprint, chunk.num_tokens)
        ok = self._put_to(0, key, chunk)
        if lower and (not self._write_back or not ok):  # write-back: lower tiers only if top refused
            with self._cv:
                self._clean.discard(key)
            ok = self._submit(key, chunk, private=private) or ok
        return ok

    def reserve(
        self, key: bytes, shape: tuple[int, ...], dtype: torch.dtype, fingerprint: bytes, num_tokens: int
    ) -> Reservation | bool | None:
        """Top-tier pool space for a chunk the caller writes in place (a device-to-host DMA
        straight into pinned pool memory), then ``commit``s; ``True`` if the top tier holds the
        key already, ``False`` if it has no room, ``None`` if the top tier is not a CPU tier (or
        failed): the caller then uses ``put``. Reserved space is invisible until committed."""
        if self._closed:
            raise TierClosedError("TierManager is closed")
        top = self.top
        if not isinstance(top, CPUTier):
            return None
        try:
            return top.reserve(key, shape, dtype, fingerprint, num_tokens)
        except SOFT_ERRORS as e:
            self._soft_fail(top, "reserve", e)
            return None

    def commit(self, r: Reservation) -> bool:
        """Publish a reserved chunk whose bytes are written, and queue it for the lower tiers
        (what ``put`` does after its top-tier copy); ``True`` if any tier took it."""
        top, io = self.top, self._io[0]
        assert isinstance(top, CPUTier)
        ok = top.commit(r)
        with io.lock:
            io.written_bytes += r.obj.nbytes if ok else 0
        if len(self.tiers) > 1 and (not self._write_back or not ok):
            view = top.pinned(r.key)  # pinned while _submit copies it: eviction cannot reuse it
            if view is not None:
                try:
                    with self._cv:
                        self._clean.discard(r.key)
                    ok = self._submit(r.key, view) or ok
                finally:
                    view.release()
        return ok

    def abort(self, r: Reservation) -> None:
        """Give back a reservation that will not be committed."""
        top = self.top
        assert isinstance(top, CPUTier)
        top.abort(r)

    def put_below(self, key: bytes, chunk: Chunk) -> bool:
        """Queue ``chunk`` for the lower tiers only: its caller already stored it in the top tier
        (the daemon commits clients' chunks to its shared CPU tier itself). A second top-tier
        ``put`` would count as an access and make ARC/S3-FIFO treat every fresh chunk as hot."""
        if self._closed:
            raise TierClosedError("TierManager is closed")
        if len(self.tiers) == 1 or self._write_back:  # write-back writes below on eviction
            return True
        with self._cv:
            self._clean.discard(key)
        return self._submit(key, chunk)

    def _put_to(self, i: int, key: bytes, chunk: Chunk) -> bool:
        tier, io = self.tiers[i], self._io[i]
        t0 = time.perf_counter()
        try:
            ok = tier.put(key, chunk)
        except SOFT_ERRORS as e:
            self._soft_fail(tier, "put", e)
            ok = False
        dt = time.perf_counter() - t0
        with io.lock:
            io.put_seconds += dt
            io.written_bytes += chunk.nbytes if ok else 0
        if ok:
            io.write_cost.observe(chunk.nbytes, dt)
        return ok

    def _submit(self, key: bytes, chunk: Chunk, *, private: bool = False) -> bool:
        """Queue ``chunk`` for every lower tier; copied first unless ``private`` (ours alone)."""
        if not private:
            chunk = Chunk(_host_copy(chunk.kv), chunk.fingerprint, chunk.num_tokens)
        with self._cv:
            self._seq += 1
            job = _Job(key, chunk, self._seq)
        block = self.config.queue_full == "block"
        any_ok = False
        for i, q in self._queues.items():
            with self._cv:
                self._pending += 1
                self._pending_keys[key] = self._pending_keys.get(key, 0) + 1
            try:
                q.put(job, block=block, timeout=self.config.queue_timeout_s if block else None)
            except queue.Full:
                self._job_done(key)
                with self._io[i].lock:
                    self._io[i].queue_drops += 1
                now = time.monotonic()
                level = logging.WARNING if now - self._last_drop_log >= 1.0 else logging.DEBUG
                self._last_drop_log = now if level == logging.WARNING else self._last_drop_log
                log.log(
                    level,
                    "write queue of tier %s is full; chunk %s dropped for it (queue_drops counts them)",
                    self.tiers[i].name,
                    key.hex(),
                )
                continue
            any_ok = True
        return any_ok

    def _write_loop(self, i: int) -> None:
        one_omp_thread()  # no OpenMP team beside the engine's (kvtier.threads)
        tier, q = self.tiers[i], self._queues[i]
        while True:
            job = q.get()
            if job is None:
                return
            try:
                if not self._cancelled(job):
                    self._put_to(i, job.key, job.chunk)
                    if self._cancelled(job):  # removed while we wrote: undo
                        tier.remove(job.key)
            except Exception as e:  # a worker must outlive any tier bug; counted and logged
                self.errors += 1
                log.exception("tier %s: asynchronous write of %s failed: %s", tier.name, job.key.hex(), e)
            finally:
                self._job_done(job.key)

    def _cancelled(self, job: _Job) -> bool:
        with self._cv:
            return self._tombstones.get(job.key, 0) >= job.seq

    def _job_done(self, key: bytes) -> None:
        with self._cv:
            self._pending -= 1
            left = self._pending_keys.get(key, 1) - 1
            if left:
                self._pending_keys[key] = left
            else:
                self._pending_keys.pop(key, None)
                self._tombstones.pop(key, None)
            self._cv.notify_all()

    def _on_top_evict(self, key: bytes, view: Chunk) -> None:
        """Write-back: the top tier is dropping ``key``; ``view`` is valid only during this call."""
        with self._cv:
            if key in self._clean:  # came from a lower tier: already there
                self._clean.discard(key)
                return
        self._submit(key, view)

    def remove(self, key: bytes) -> bool:
        with self._cv:
            self._clean.discard(key)
            if key in self._pending_keys:
                self._tombstones[key] = self._seq
        removed = False
        for tier in self.tiers:
            try:
                removed = tier.remove(key) or removed
            except SOFT_ERRORS as e:
                self._soft_fail(tier, "remove", e)
        return removed

    # -- prefetch ---------------------------------------------------------------------------------
    def prefetch(self, keys: Sequence[bytes]) -> Future[int]:
        """Start loading the cached prefix of ``keys`` into the top tier; the future gives the
        number of chunks loaded (0 when all were already on top or none is cached)."""
        keys = list(keys)
        events: dict[bytes, threading.Event] = {}
        with self._cv:
            for k in keys:
                if k not in self._inflight and not self.top.contains(k):
                    events[k] = self._inflight[k] = threading.Event()
        try:
            return self._prefetcher.submit(self._prefetch, keys, events)
        except RuntimeError:  # closed
            self._finish_prefetch(events)
            done: Future[int] = Future()
            done.set_result(0)
            return done

    def probe(self, i: int, key: bytes) -> Future[bool]:
        """Read ``key`` from tier ``i`` in the background, only to measure the tier again (the
        read is timed like any other and then released, never promoted); the future says
        whether it was there. What ``lookup_by_cost`` does for a tier it stopped asking."""
        try:
            return self._prefetcher.submit(self._probe, i, key)
        except RuntimeError:  # closed
            done: Future[bool] = Future()
            done.set_result(False)
            return done

    def _probe(self, i: int, key: bytes) -> bool:
        c = self._get_from(i, key)
        if c is None:
            return False
        c.release()
        return True

    def _prefetch(self, keys: list[bytes], events: dict[bytes, threading.Event]) -> int:
        loaded = 0
        try:
            todo = [k for k in keys[: self.prefix_lookup(keys)] if k in events]
            hole = False
            for b in range(0, len(todo), PREFETCH_BATCH):
                batch = todo[b : b + PREFETCH_BATCH]
                for key, (src, c) in zip(batch, self._fetch_lower(batch)):
                    hole = hole or c is None  # a hole (evicted/corrupt meanwhile) ends the prefix
                    if c is None:
                        continue
                    with c:  # released even past a hole: it may be a tier's recycled buffer
                        loaded += 0 if hole else self._promote(src, key, c)
                    events[key].set()
                if hole:
                    break
            return loaded
        finally:
            self._finish_prefetch(events)

    def _fetch_lower(self, keys: list[bytes]) -> list[tuple[int, Chunk | None]]:
        """Each key's chunk from the first lower tier that has it, reading each tier in a batch."""
        out: list[tuple[int, Chunk | None]] = [(0, None)] * len(keys)
        for i in range(1, len(self.tiers)):
            tier = self.tiers[i]
            idx = [j for j, (_, c) in enumerate(out) if c is None and self._contains(tier, keys[j])]
            if not idx:
                continue
            got = self._batched_get_from(i, [keys[j] for j in idx])
            if got is None:
                continue
            for j, c in zip(idx, got):
                out[j] = (i, c)
        return out

    def _finish_prefetch(self, events: dict[bytes, threading.Event]) -> None:
        with self._cv:
            for k, ev in events.items():
                ev.set()
                if self._inflight.get(k) is ev:
                    del self._inflight[k]

    def _contains(self, tier: Tier, key: bytes) -> bool:
        try:
            return tier.contains(key)
        except SOFT_ERRORS as e:
            self._soft_fail(tier, "contains", e)
            return False

    # -- lifecycle and stats ----------------------------------------------------------------------
    def stats(self) -> dict[str, TierStats]:
        out: dict[str, TierStats] = {}
        for i, t in enumerate(self.tiers):
            try:
                s = t.stats()
            except SOFT_ERRORS as e:
                self._soft_fail(t, "stats", e)
                s = TierStats(t.name)
            io = self._io[i]
            with io.lock:
                s.read_bytes += io.read_bytes
                s.written_bytes += io.written_bytes
                s.get_seconds += io.get_seconds
                s.put_seconds += io.put_seconds
                s.promotions += io.promotions
                s.queue_drops += io.queue_drops
            if i in self._queues:
                s.queue_depth = self._queues[i].qsize()
            out[t.name] = s
        return out

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until queued writes are done, then make lower tiers durable (``sync()``).

        ``True`` when everything queued before the call is stored and synced; ``False`` on
        timeout or a failed sync.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self._pending > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        ok = True
        for tier in self.tiers:  # the top tier too: a daemon (RemoteTier) on top syncs remotely
            try:
                ok = bool(tier.sync()) and ok
            except SOFT_ERRORS as e:
                self._soft_fail(tier, "sync", e)
                ok = False
        return ok

    def close(self) -> None:
        """Finish prefetches, write back what write-back still holds, drain, close the tiers."""
        if self._closed:
            return
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._reader.shutdown(wait=True)  # reads in flight finish; their iterators release them
        with self._cv:  # prefetches cancelled before they ran: wake anyone waiting on their keys
            for ev in self._inflight.values():
                ev.set()
            self._inflight.clear()
        if self._write_back:
            self._write_back_all()
        self._closed = True
        if not self.flush(self.config.close_timeout_s):
            log.warning(
                "TierManager.close: writes still queued after %.0f s are lost", self.config.close_timeout_s
            )
        for q in self._queues.values():
            q.put(None)
        for t in self._workers:
            t.join(timeout=self.config.close_timeout_s)
        for tier in self.tiers:
            tier.close()

    def _write_back_all(self) -> None:
        for key in self.top.keys() or []:
            if key in self._clean:
                continue
            c = self._get_from(0, key)
            if c is not None:
                with c:
                    self._submit(key, c)

    def _soft_fail(self, tier: Tier, op: str, e: BaseException) -> None:
        self.errors += 1
        log.warning("tier %s failed on %s (%s: %s); treated as a miss", tier.name, op, type(e).__name__, e)


def _host_copy(kv: torch.Tensor) -> torch.Tensor:
    """A private, contiguous host copy of ``kv``."""
    out = torch.empty(kv.shape, dtype=kv.dtype)
    out.copy_(kv)
    return out
