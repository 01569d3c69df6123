"""What the Redis and S3 tiers share: the circuit-breaker guard, chunk <-> bytes, the counters.

Every call to the store goes through ``NetworkTier._guard``: if the breaker is open it returns
the caller's default at once (a miss, a skipped write); otherwise it runs the call, and a
failure of the kinds in ``failure_types`` (connection refused, timeout, protocol error) is
counted in ``TierStats.errors``, reported to the breaker and turned into the default. So a dead
or slow store never raises to the caller and never costs more than one timeout per breaker
period.

Why a remote tier's ``chunks``/``bytes_used`` are "what this client wrote": the store is shared
by other engine processes and evicts/expires on its own, so only a scan could count it, and
``stats()`` must stay cheap. ``capacity_enforced = False`` says the same thing to the
conformance suite: the *store* bounds its memory (Redis ``maxmemory`` + an eviction policy, an
S3 lifecycle rule), not this client.

Invariant: values carry the chunk's own key in their header (``serde`` ``key=``), and a read
passes ``expect_key``: a value that landed under the wrong key, was truncated or bit-flipped is
a miss (and is deleted by the tier), never wrong KV.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import torch

from kvtier import serde
from kvtier.tiers.base import Chunk, Tier, TierError, TierStats
from kvtier.tiers.breaker import CircuitBreaker

log = logging.getLogger(__name__)
T = TypeVar("T")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:***@{hostinfo}" if ":" in userinfo else f"***@{hostinfo}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def leading_true(flags: Sequence[Any]) -> int:
    """How many leading ``flags`` are truthy (a prefix lookup stops at the first miss)."""
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


class NetworkTier(Tier):
    """Base of the network tiers: breaker guard, serde, counters. Subclasses do the I/O."""

    capacity_enforced = False

    def __init__(self, name: str, endpoint: str, *, serde_name: str, failure_types: tuple[type[BaseException], ...],
                 failure_threshold: int = 3, retry_backoff_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.name = name
        self.serde_name = serde_name
        serde.get_codec(serde_name)  # unknown codec: fail at construction, not on the first put
        self._failure_types = failure_types
        self.breaker = CircuitBreaker(f"{name} tier {redact_url(endpoint)}", failure_threshold=failure_threshold,
                                      backoff_initial_s=retry_backoff_s, backoff_max_s=max(30.0, retry_backoff_s),
                                      clock=clock, on_open=self._reset_connection)  # fmt: skip
        self._stats = TierStats(name)
        self._lock = threading.Lock()
        self._closed = False

    # -- subclass hooks -------------------------------------------------------------------------
    def _reset_connection(self) -> None:
        """Drop pooled connections (called when the breaker opens) so a probe reconnects."""

    # -- the guard ------------------------------------------------------------------------------
    def _guard(self, op: str, fn: Callable[[], T], default: T) -> T:
        """``fn()`` if the store is believed up; ``default`` if the breaker is open or ``fn`` fails."""
        if self._closed:
            raise TierError(f"{self.name} tier is closed")
        if not self.breaker.allow():
            return default
        try:
            result = fn()
        except self._failure_types as e:
            with self._lock:
                self._stats.errors += 1
            log.debug("%s: %s failed: %s: %s", self.breaker.name, op, type(e).__name__, e)
            self.breaker.failure(e)
            return default
        self.breaker.success()
        return result

    # -- serde ----------------------------------------------------------------------------------
    def _encode(self, key: bytes, chunk: Chunk) -> bytearray | bytes:
        """One blob (header + payload). Raw: the KV is copied once, straight into the blob."""
        try:
            if self.serde_name != "raw":
                return serde.encode(chunk, self.serde_name, key)
            kv = chunk.kv.detach()
            nbytes = kv.numel() * kv.element_size()
            blob = bytearray(serde.HEADER_BYTES + nbytes)
            if nbytes:
                dst = torch.frombuffer(blob, dtype=torch.uint8, offset=serde.HEADER_BYTES, count=nbytes)
                dst = dst.view(kv.dtype).view(kv.shape)
                dst.copy_(kv)
            else:
                dst = torch.empty(kv.shape, dtype=kv.dtype)
            header, _ = serde.encode_parts(Chunk(dst, chunk.fingerprint, chunk.num_tokens), "raw", key)
            blob[: serde.HEADER_BYTES] = header
            return blob
        except serde.SerdeError as e:
            raise TierError(f"{self.name} tier cannot store this chunk: {e}") from e

    def _decode(self, key: bytes, data: bytes | bytearray | memoryview) -> Chunk | None:
        """The chunk in ``data``, or ``None`` (logged, counted) if it is corrupt or mis-filed."""
        try:
            return serde.decode(data, expect_key=key)
        except serde.CorruptChunkError as e:
            with self._lock:
                self._stats.errors += 1
            log.warning("%s: value for %s is corrupt (%s); treated as a miss and deleted",
                        self.breaker.name, key.hex(), e)  # fmt: skip
            return None

    # -- counters -------------------------------------------------------------------------------
    def _count_get(self, hits: int, misses: int) -> None:
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += misses

    def _count_put(self, new: int, new_bytes: int, failed: int) -> None:
        with self._lock:
            self._stats.puts += new
            self._stats.chunks += new
            self._stats.bytes_used += new_bytes
            self._stats.put_failures += failed

    def _count_remove(self, nbytes: int) -> None:
        with self._lock:
            self._stats.chunks = max(0, self._stats.chunks - 1)
            self._stats.bytes_used = max(0, self._stats.bytes_used - nbytes)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**vars(self._stats))

    def close(self) -> None:
        self._closed = True
