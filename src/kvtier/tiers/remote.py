"""The kvtier daemon as a Tier: ``remote.url = "kvtier://127.0.0.1:5555"``.

An in-process CacheEngine switches to daemon mode by config alone: this tier forwards
``contains/get/put/remove`` to ``kvtier server`` (``server/client.py``), batched where the Tier
API allows (``prefix_contains`` is one round trip, not one per key).

Invariants:
* Never raises to the engine for a run-time condition: a daemon that is down, slow (every call
  has ``timeout_s``), restarting or answering garbage gives misses (``get`` -> ``None``,
  ``put`` -> ``False``). Calls go through the same ``CircuitBreaker`` as Redis and S3: it opens
  after ``failure_threshold`` fast failures or one call that ran into its timeout (a SIGSTOPped
  daemon), and while open the tier answers misses without touching the socket; a background
  probe (``Ping`` on a fresh connection) closes it again within ``retry_backoff_max_s × 1.1 +
  timeout_s`` of the daemon's return. So an outage costs a caller at most one ``timeout_s``.
* Logs: an outage is one WARNING (the breaker opening) and one INFO (it closing again); each
  failed call is a DEBUG line. A refused call (the daemon answered ``invalid``) is a WARNING the
  first time and DEBUG after that. Every failure is counted in ``stats().errors``.
* ``get`` may return a view into the daemon's shared pool (same host): the engine copies it and
  calls ``release()``, which returns the lease. A chunk must be released well within the
  daemon's lease timeout (``cpu.pin_timeout_s`` of the daemon, 60 s by default).
* ``sync()`` (called by ``TierManager.flush``) asks the daemon to drain its lower-tier write
  queues and fsync them: ``True`` means every chunk ``put`` accepted is on the daemon's disk (or
  the daemon has no durable tier). ``False`` when the daemon is unreachable or times out.
* ``stats()``: ``hits/misses/puts/put_failures/errors`` count *this client's* calls;
  ``chunks/bytes_used/capacity_bytes/evictions`` are the daemon's CPU tier (shared by all
  clients) — zeros while it is unreachable.

URL: ``kvtier://HOST:PORT[?shm=0]``; ``shm=0`` forces KV over the socket even on the same host.
The auth token comes from ``server.auth_token_file`` (the same file the daemon reads); without
one, from the token file a daemon on this host generated for its port (``wire/token_file.py``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

import torch

from kvtier.chunk import Chunk
from kvtier.tiers.base import Tier, TierClosedError, TierError, TierStats
from kvtier.tiers.breaker import CircuitBreaker
from kvtier.wire.client import DaemonClient, DaemonError
from kvtier.wire.protocol import ProtocolError

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def parse_url(url: str) -> tuple[str, int, bool]:
    """``kvtier://host:port[?shm=0|1]`` -> ``(host, port, use_shm)``; ``TierError`` if malformed."""
    parts = urlsplit(url)
    if parts.scheme != "kvtier" or not parts.hostname:
        raise TierError(f"remote url {url!r}: expected kvtier://HOST:PORT")
    try:
        port = parts.port
    except ValueError as e:
        raise TierError(f"remote url {url!r}: {e}") from e
    if port is None:
        raise TierError(f"remote url {url!r}: missing :PORT")
    shm = parse_qs(parts.query).get("shm", ["1"])[-1]
    if shm not in ("0", "1"):
        raise TierError(f"remote url {url!r}: shm must be 0 or 1")
    return parts.hostname, port, shm == "1"


class RemoteTier(Tier):
    """A client of ``kvtier server``."""

    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        token: str = "",
        token_file: str = "",
        failure_threshold: int = 3,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 5.0,
        flush_timeout_s: float = 60.0,
    ) -> None:
        host, port, use_shm = parse_url(url)
        if token_file and not token:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as e:
                raise TierError(f"auth token file {token_file}: {e.strerror}") from e
        self.url = url
        self.timeout_s = timeout_s
        self.client = DaemonClient(host, port, token=token, timeout_s=timeout_s, use_shm=use_shm)
        self.breaker = CircuitBreaker(
            f"kvtier daemon {url}",
            failure_threshold=failure_threshold,
            backoff_initial_s=retry_backoff_s,
            backoff_max_s=max(retry_backoff_s, retry_backoff_max_s),
            probe=self._ping,
        )
        self._probe_client = functools.partial(
            DaemonClient,
            host,
            port,
            token=token,
            timeout_s=timeout_s,
            use_shm=False,
            client_name="kvtier-probe",
        )
        self.flush_timeout_s = flush_timeout_s
        self._lock = threading.Lock()
        self._stats = TierStats(self.name)
        self._refusals = 0
        self._closed = False

    # -- failure handling -----------------------------------------------------------------------
    def _call(self, op: str, fn: Callable[[DaemonClient], _T], default: _T) -> _T:
        """``fn(client)``, or ``default`` when the breaker is open, the call fails, or another call
        holds the connection for longer than ``timeout_s`` (so a call never waits more than one
        timeout in total: the lock wait and the call share the budget, see below)."""
        t0 = time.monotonic()
        if self._closed or not self.breaker.allow():
            return default
        # NOTE: one connection, one call at a time. Waiting for it counts against the same
        # timeout: a call stuck behind a stalled one fails with it, it does not add its own.
        if not self._lock.acquire(timeout=self.timeout_s):
            return default
        try:
            if self._closed or not self.breaker.allow():  # it may have opened while we waited
                return default
            try:
                if not self.client.connected:
                    self.client.connect()
                result = fn(self.client)
            except DaemonError as e:
                if e.code == "invalid":  # this request was refused; the connection is fine
                    self._stats.errors += 1
                    self._refused(op, e)
                    self.breaker.success()
                    return default
                self._down(op, e, t0)
                return default
            except (OSError, ProtocolError) as e:
                self._down(op, e, t0)
                return default
            self.breaker.success()
            return result
        finally:
            self._lock.release()

    def _refused(self, op: str, e: DaemonError) -> None:
        """Log a refusal: the first one at WARNING, later ones at DEBUG (all counted in ``errors``).

        NOTE: a client/daemon mismatch refuses every call; one line per call would flood the log
        (the issue counted 35 lines in one outage), the same reason the breaker logs an outage once."""
        self._refusals += 1
        level = logging.WARNING if self._refusals == 1 else logging.DEBUG
        log.log(
            level,
            "kvtier daemon at %s refused %s: %s%s",
            self.url,
            op,
            e,
            " (further refusals are logged at DEBUG and counted in the tier's errors)"
            if self._refusals == 1
            else "",
        )

    def _down(self, op: str, e: BaseException, t0: float) -> None:
        self.client.close()
        self._stats.errors += 1
        log.debug("kvtier daemon at %s failed on %s: %s: %s", self.url, op, type(e).__name__, e)
        # NOTE: a call that ran into (half) its timeout opens the breaker at once: a stalled daemon
        # must cost one timeout, not failure_threshold of them.
        self.breaker.failure(e, slow=time.monotonic() - t0 >= self.timeout_s / 2)

    def _ping(self) -> None:
        """The breaker's background probe: a fresh connection and one ``Ping`` (no shared memory),
        so it never touches the request path's connection or lock."""
        c = self._probe_client()
        try:
            c.connect()
            c.ping()
        finally:
            c.close()

    # -- the Tier API ---------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return self._call("contains", lambda c: c.prefix([key]) == 1, False)

    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        return self._call("prefix", lambda c: c.prefix(keys), 0)

    def get(self, key: bytes) -> Chunk | None:
        return self.batched_get([key])[0]

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        miss: list[Chunk | None] = [None] * len(keys)
        got = self._call("get", lambda c: c.get(keys), miss)
        hits = sum(g is not None for g in got)
        self._stats.hits += hits
        self._stats.misses += len(keys) - hits
        return got

    def batched_get_into(
        self, keys: Sequence[bytes], into: Sequence[torch.Tensor | None]
    ) -> list[Chunk | None]:
        """``batched_get`` receiving each hit's bytes straight into ``into`` over a socket
        connection (``DaemonClient.get``); shared memory ignores it (its chunks are pool views)."""
        miss: list[Chunk | None] = [None] * len(keys)
        got = self._call("get", lambda c: c.get(keys, into), miss)
        hits = sum(g is not None for g in got)
        self._stats.hits += hits
        self._stats.misses += len(keys) - hits
        return got

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self.batched_put([(key, chunk)])[0]

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        items = list(items)
        if self._closed:
            raise TierClosedError("remote tier is closed")
        ok = self._call("put", lambda c: c.put(items), [False] * len(items))
        self._stats.puts += sum(ok)
        self._stats.put_failures += len(ok) - sum(ok)
        return ok

    def remove(self, key: bytes) -> bool:
        return self._call("remove", lambda c: c.remove([key]), 0) > 0

    def clear(self) -> None:
        """Drop everything in the daemon's CPU tier (all clients' chunks: admin and tests)."""
        self._call("clear", lambda c: c.clear(), None)

    def sync(self) -> bool:
        """Durable in the daemon (its queues drained, its disk fsynced); ``False`` if not known to be.

        Holds the client for up to ``flush_timeout_s``: a flush is an explicit checkpoint, not a
        request path."""
        return self._call("flush", lambda c: c.flush(self.flush_timeout_s), False)

    def stats(self) -> TierStats:
        s = TierStats(**vars(self._stats))
        empty: dict[str, dict[str, float]] = {}
        remote = self._call("stats", lambda c: c.stats(), empty).get("tier:cpu", {})
        for f in ("chunks", "bytes_used", "capacity_bytes", "evictions", "evicted_bytes"):
            setattr(s, f, int(remote.get(f, 0)))
        return s

    @property
    def shm(self) -> bool:
        """Whether KV moves through shared memory on the current connection."""
        return self.client.shm

    def close(self) -> None:
        self._closed = True
        self.breaker.close()
        if self._lock.acquire(timeout=self.timeout_s):  # a stalled call fails on its own timeout
            try:
                self.client.close()
            finally:
                self._lock.release()
