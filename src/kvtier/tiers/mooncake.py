"""The Mooncake Store tier: chunks as objects in a Mooncake distributed store (``mooncake://``).

Mooncake Store (the KV store LMCache and SGLang HiCache use) pools memory that its clients
contribute (each client mounts a *segment*) under one master that holds the metadata. This tier
is such a client: it mounts ``segment`` bytes of its own, puts each chunk as one object
``{prefix}/{hex digest}`` (header and payload as two parts, sent from the KV tensor's memory
without a join), and reads it back with one batched get. The digest folds in the namespace, so
every process with the same namespace and master shares chunks, as with Redis.

What Mooncake does that shapes this tier (observed against a real master, 0.3.13):

- A put of a key that exists answers 0 and keeps the first object: first writer wins, like the
  Redis tier's ``MSETNX``; a reader never sees half an object.
- Calls report failures as negative status codes, not exceptions; a get of a missing key (or
  during an outage) answers ``b""``. A chunk is never empty (its header alone is 128 bytes), so
  an empty answer is a miss. Codes are turned into ``MooncakeError`` here, so the shared breaker
  guard (``network``) counts them: ``-900`` (RPC failed: master down) opens the breaker; ``-200``
  (no space) and ``-600`` (a value larger than the client's transfer ``buffer``) are refusals —
  the store is up and said no.
- A read takes a lease (10 s by default) during which a plain remove fails; a corrupt object is
  removed with ``force``.
- The master keeps its metadata in memory: a restarted master has forgotten every object (each a
  miss afterwards), and objects in a client's segment go when that client exits.
- Calls are synchronous C++; a hung master could block one. Each call therefore runs on the
  tier's small thread pool and is waited for at most ``timeout_s``: a hung store costs a request
  one timeout (and opens the breaker), never more.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from kvtier.chunk import Chunk
from kvtier.config import MooncakeURL, parse_mooncake_url
from kvtier.serde import HEADER_BYTES
from kvtier.serde.codec import Buffer
from kvtier.tiers.base import TierClosedError, TierError
from kvtier.tiers.network import NetworkTier

log = logging.getLogger(__name__)
T = TypeVar("T")

RPC_FAIL = -900
NO_AVAILABLE_HANDLE = -200  # the store has no room
INVALID_PARAMS = -600  # e.g. a value larger than the client's registered buffer
OBJECT_NOT_FOUND = -704
_REFUSED = frozenset({NO_AVAILABLE_HANDLE, INVALID_PARAMS})
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class MooncakeError(TierError):
    """A Mooncake call answered a failure status (master unreachable, transfer failed, ...)."""

    def __init__(self, op: str, code: int) -> None:
        super().__init__(f"mooncake {op} failed with status {code}")
        self.code = code


class MooncakeRefused(TierError):
    """The store is up and declined (no space, a value over the client's buffer)."""


class _DaemonPool:
    """A fixed set of daemon threads running submitted calls.

    Why not ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so one call stuck
    in Mooncake's C++ (a hung master: its setup retries for ~90 s) would hold the engine's exit
    hostage. Daemon threads are abandoned instead; the caller already gave up at ``timeout_s``.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._q.put((fn, fut))
        return fut

    def shutdown(self) -> None:
        for _ in self._threads:
            self._q.put(None)


def _settle_threads(timeout_s: float = 2.0, poll_s: float = 0.05) -> None:
    """Wait (at most ``timeout_s``) until this process's OS thread count stops falling.

    Why: Mooncake's client tears its transfer threads down asynchronously after ``close()``; a
    process that exits right then (a short-lived engine: store, close, exit) was aborted by
    ``terminate called without an active exception`` during C++ static destruction
    (tests/remote/test_mooncake.py::test_process_b_retrieves_what_process_a_stored_through_a_store_service,
    SIGABRT after a clean close). The count fell 39 -> 18 -> 11 within 0.1 s of ``close()``, so
    waiting until it is steady for three polls costs ~0.15 s once per tier close. Off Linux
    (no ``/proc/self/task``) a fixed short wait stands in.
    """
    task_dir = "/proc/self/task"
    if not os.path.isdir(task_dir):
        time.sleep(min(timeout_s, 0.2))
        return
    deadline = time.monotonic() + timeout_s
    last, steady = len(os.listdir(task_dir)), 0
    while steady < 3 and time.monotonic() < deadline:
        time.sleep(poll_s)
        now = len(os.listdir(task_dir))
        steady = steady + 1 if now >= last else 0
        last = now


def _store_class() -> Any:
    """Mooncake's client class, imported on first use (the ``mooncake`` extra is optional)."""
    from mooncake.store import MooncakeDistributedStore

    return MooncakeDistributedStore


class MooncakeTier(NetworkTier):
    """Chunks in a Mooncake Store. Thread-safe (calls go through one client from a thread pool)."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "kvtier",
        serde_name: str = "raw",
        timeout_s: float = 2.0,
        max_workers: int = 8,
        failure_threshold: int = 3,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target: MooncakeURL = parse_mooncake_url(url)
        if timeout_s <= 0 or max_workers < 1:
            raise TierError(
                f"mooncake tier: need timeout_s > 0 and max_workers >= 1, got {timeout_s}, {max_workers}"
            )
        _store_class()  # a missing extra fails at construction, with the module's name
        super().__init__(
            "mooncake",
            url,
            serde_name=serde_name,
            failure_types=(MooncakeError, OSError),
            refusal_types=(MooncakeRefused,),
            failure_threshold=failure_threshold,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
            timeout_s=timeout_s,
            clock=clock,
        )
        self.prefix = key_prefix
        self._pool = _DaemonPool(max_workers, "kvtier-mooncake")
        self._store: Any = None
        self._store_lock = threading.Lock()

    # -- the client ----------------------------------------------------------------------------
    def _client(self) -> Any:
        """The mounted client, set up on first use: a master that is down at start is a miss."""
        s = self._store
        if s is not None:
            return s
        with self._store_lock:
            if self._store is None:
                t = self.target
                local = t.local or (
                    "127.0.0.1" if t.master.rpartition(":")[0] in _LOOPBACK else socket.gethostname()
                )
                host, _, port = t.master.rpartition(":")
                # NOTE: Mooncake's setup holds the GIL while it retries a dead master (~90 s): the
                # whole engine would stall, not just this call. A bounded TCP connect first turns
                # "nobody listens" into a fast RPC failure (a hung-but-listening master still can).
                try:
                    socket.create_connection((host, int(port)), timeout=self.timeout_s).close()
                except OSError as e:
                    raise MooncakeError(f"setup (master {t.master}: {e})", RPC_FAIL) from None
                store = _store_class()()
                rc = store.setup(
                    local, t.metadata, t.segment_bytes, t.buffer_bytes, t.protocol, t.device, t.master
                )
                if rc != 0:
                    store.close()
                    raise MooncakeError("setup", int(rc))
                if self._closed:  # closed while setup ran (close() does not wait for a stuck setup)
                    store.close()
                    raise TierClosedError("mooncake tier is closed")
                log.info("mooncake tier: mounted %d bytes at master %s", t.segment_bytes, t.master)
                self._store = store
            return self._store

    def _reset_connection(self) -> None:
        """Nothing to drop: the client re-establishes its master RPC by itself once it is back."""

    def _call(self, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the pool, waited for at most ``timeout_s``."""
        fut = self._pool.submit(lambda: fn(self._client()))
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise MooncakeError(f"call (no answer within {self.timeout_s}s)", RPC_FAIL) from None

    def _ping(self) -> None:
        rc = self._call(lambda s: int(s.is_exist(f"{self.prefix}/ping")))
        if rc < 0:
            raise MooncakeError("ping", rc)

    def _ok(self, key: bytes) -> str:
        return f"{self.prefix}/{key.hex()}"

    # -- Tier API -------------------------------------------------------------------------------
    def _exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        codes = self._call(lambda s: list(s.batch_is_exist([self._ok(k) for k in keys])))
        bad = [c for c in codes if c < 0]
        if bad:
            raise MooncakeError("batch_is_exist", int(bad[0]))
        return [c == 1 for c in codes]

    def _fetch_many(self, keys: Sequence[bytes]) -> list[tuple[Buffer, Buffer] | None]:
        values = self._call(lambda s: list(s.get_batch([self._ok(k) for k in keys])))
        out: list[tuple[Buffer, Buffer] | None] = []
        for v in values:
            if not v:
                out.append(None)
                continue
            mv = memoryview(v)
            out.append((mv[:HEADER_BYTES], mv[HEADER_BYTES:]))
        return out

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        pairs = list(items)
        if not pairs:
            return []
        encoded = [(self._ok(k), *self._encode(k, c)) for k, c in pairs]  # bad input raises before any I/O

        def put_all(s: Any) -> list[int]:
            sizes = []
            for name, header, payload in encoded:
                rc = int(s.put_parts(name, header, payload))
                if rc in _REFUSED:
                    raise MooncakeRefused(
                        f"mooncake put refused with status {rc} (no space in the store, or a chunk of "
                        f"{len(header) + len(payload)} bytes over the client's buffer= "
                        f"{self.target.buffer_bytes}: raise buffer= in remote.url)"
                    )
                if rc < 0:
                    raise MooncakeError("put", rc)
                sizes.append(len(header) + len(payload))
            return sizes

        sizes = self._guard("put", lambda: self._call(put_all), None)
        if sizes is None:
            self._count_put(0, 0, len(pairs))
            return [False] * len(pairs)
        self._count_put(len(pairs), sum(sizes), 0)
        return [True] * len(pairs)

    def remove(self, key: bytes) -> bool:
        def run(s: Any) -> bool:
            name = self._ok(key)
            size = int(s.get_size(name))
            rc = int(s.remove(name, True))  # force: a read's lease would otherwise keep it ~10 s
            if rc == OBJECT_NOT_FOUND or (rc == 0 and size < 0):
                return False
            if rc < 0:
                raise MooncakeError("remove", rc)
            self._count_remove(max(size, 0))
            return True

        return self._guard("remove", lambda: self._call(run), False)

    def close(self) -> None:
        """Unmount and stop; never waits on a call stuck in Mooncake (no lock taken here: a setup
        still running sees ``_closed`` and closes its own client)."""
        super().close()
        self._pool.shutdown()
        s, self._store = self._store, None
        if s is not None:
            s.close()
            del s  # the last reference: the client's destructor starts its threads' teardown
            _settle_threads()
