"""The kvtier daemon as a Tier: ``remote.url = "kvtier://127.0.0.1:5555"``.

An in-process CacheEngine switches to daemon mode by config alone: this tier forwards
``contains/get/put/remove`` to ``kvtier server`` (``server/client.py``), batched where the Tier
API allows (``prefix_contains`` is one round trip, not one per key).

Invariants:
* Never raises to the engine for a run-time condition: a daemon that is down, slow (every call
  has ``timeout_s``), restarting or answering garbage gives misses (``get`` -> ``None``,
  ``put`` -> ``False``). After a failure the tier stays "down" for a backoff that doubles from
  ``backoff_initial_s`` to ``backoff_max_s``, so a dead daemon costs one failed connect per
  backoff period, not a timeout per call; the first call after it reconnects.
* ``get`` may return a view into the daemon's shared pool (same host): the engine copies it and
  calls ``release()``, which returns the lease. A chunk must be released well within the
  daemon's lease timeout (``cpu.pin_timeout_s`` of the daemon, 60 s by default).
* ``stats()``: ``hits/misses/puts/put_failures/errors`` count *this client's* calls;
  ``chunks/bytes_used/capacity_bytes/evictions`` are the daemon's CPU tier (shared by all
  clients) — zeros while it is unreachable.

URL: ``kvtier://HOST:PORT[?shm=0]``; ``shm=0`` forces KV over the socket even on the same host.
The auth token comes from ``server.auth_token_file`` (the same file the daemon reads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from kvtier.chunk import Chunk
from kvtier.tiers.base import Tier, TierClosedError, TierError, TierStats
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

    def __init__(self, url: str, *, timeout_s: float = 2.0, token: str = "", token_file: str = "",
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 2.0) -> None:  # fmt: skip
        host, port, use_shm = parse_url(url)
        if token_file and not token:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as e:
                raise TierError(f"auth token file {token_file}: {e.strerror}") from e
        self.url = url
        self.client = DaemonClient(host, port, token=token, timeout_s=timeout_s, use_shm=use_shm)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._backoff = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._stats = TierStats(self.name)
        self._closed = False

    # -- failure handling -----------------------------------------------------------------------
    def _call(self, op: str, fn: Callable[[DaemonClient], _T], default: _T) -> _T:
        with self._lock:
            if self._closed:
                return default
            now = time.monotonic()
            if not self.client.connected:
                if now < self._retry_at:
                    return default
                try:
                    self.client.connect()
                except (OSError, ProtocolError) as e:
                    self._down(op, e, now)
                    return default
                self._backoff = 0.0
            try:
                return fn(self.client)
            except DaemonError as e:
                if e.code == "invalid":  # this request was refused; the connection is fine
                    self._stats.errors += 1
                    log.warning("kvtier daemon refused %s: %s", op, e)
                    return default
                self._down(op, e, now)
            except (OSError, ProtocolError) as e:
                self._down(op, e, now)
            return default

    def _down(self, op: str, e: BaseException, now: float) -> None:
        self.client.close()
        self._stats.errors += 1
        self._backoff = min(self.backoff_max_s, max(self.backoff_initial_s, self._backoff * 2))
        self._retry_at = now + self._backoff
        log.warning("kvtier daemon at %s unavailable on %s (%s: %s); misses for %.2fs",
                    self.url, op, type(e).__name__, e, self._backoff)  # fmt: skip

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
        with self._lock:
            self._closed = True
            self.client.close()
