"""What the Redis and S3 tiers share: the circuit-breaker guard, chunk <-> bytes, the counters.

Every call to the store goes through ``NetworkTier._guard``: if the breaker is open it returns
the caller's default at once (a miss, a skipped write); otherwise it runs the call, and a
failure of the kinds in ``failure_types`` (connection refused, timeout, protocol error) is
counted in ``TierStats.errors``, reported to the breaker and turned into the default. So a dead
or slow store never raises to the caller and never costs more than one timeout per breaker
period. A *refusal* (``refusal_types``: the store answered with an error, e.g. Redis out of
memory under ``noeviction``, or an ACL denial) is counted and logged once per kind, but does not
open the breaker: the store is up, and reads may still succeed.

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
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from kvtier import serde
from kvtier.chunk import Chunk
from kvtier.redact import redact_url
from kvtier.serde.base import check_key, verify_payload
from kvtier.serde.codec import Buffer
from kvtier.tiers.base import Tier, TierClosedError, TierError, TierStats
from kvtier.tiers.breaker import CircuitBreaker

log = logging.getLogger(__name__)
# A received ``bytes`` reply becomes a tensor without a copy; torch warns (once) that the buffer
# is read-only. Nothing else holds the reply, so a caller writing into the chunk is harmless.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
T = TypeVar("T")


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

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        serde_name: str,
        failure_types: tuple[type[BaseException], ...],
        refusal_types: tuple[type[BaseException], ...] = (),
        failure_threshold: int = 3,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 5.0,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.serde_name = serde_name
        serde.get_codec(serde_name)  # unknown codec: fail at construction, not on the first put
        self._failure_types = failure_types
        self._refusal_types = refusal_types
        self._refusals_logged: set[type[BaseException]] = set()
        self.breaker = CircuitBreaker(
            f"{name} tier {redact_url(endpoint)}",
            failure_threshold=failure_threshold,
            backoff_initial_s=retry_backoff_s,
            backoff_max_s=max(retry_backoff_max_s, retry_backoff_s),
            clock=clock,
            on_open=self._reset_connection,
            probe=self._ping,
        )
        self.timeout_s = timeout_s
        self._stats = TierStats(name)
        self._lock = threading.Lock()
        self._closed = False

    # -- subclass hooks -------------------------------------------------------------------------
    def _reset_connection(self) -> None:
        """Drop pooled connections (called when the breaker opens) so a probe reconnects."""

    def _ping(self) -> None:
        """One cheap request to the store, bounded by ``timeout_s``; raises if it is down. The
        breaker's background prober calls it while open, so no request waits on a dead store."""
        raise NotImplementedError

    # -- the guard ------------------------------------------------------------------------------
    def _guard(self, op: str, fn: Callable[[], T], default: T) -> T:
        """``fn()`` if the store is believed up; ``default`` if the breaker is open or ``fn`` fails."""
        if self._closed:
            raise TierClosedError(f"{self.name} tier is closed")
        if not self.breaker.allow():
            return default
        t0 = time.monotonic()
        try:
            result = fn()
        except self._refusal_types as e:  # the store is up but refused (out of memory, ACL): not an outage
            with self._lock:
                self._stats.errors += 1
                first = type(e) not in self._refusals_logged
                self._refusals_logged.add(type(e))
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "%s: %s refused: %s: %s",
                self.breaker.name,
                op,
                type(e).__name__,
                e,
            )
            self.breaker.success()
            return default
        except self._failure_types as e:
            with self._lock:
                self._stats.errors += 1
            log.debug("%s: %s failed: %s: %s", self.breaker.name, op, type(e).__name__, e)
            # NOTE: half the timeout counts as "ran into it": a stalled store must cost one timeout
            self.breaker.failure(e, slow=time.monotonic() - t0 >= self.timeout_s / 2)
            return default
        self.breaker.success()
        return result

    # -- the shared read path: subclasses supply _exists_many / _fetch_many ----------------------
    def _exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored (one round trip or one parallel fan-out); may raise."""
        raise NotImplementedError

    def _fetch_many(self, keys: Sequence[bytes]) -> Sequence[tuple[Buffer, Buffer] | Chunk | None]:
        """``(header, payload)`` per key (or a ``Chunk`` already verified), ``None`` when absent; may raise."""
        raise NotImplementedError

    def contains(self, key: bytes) -> bool:
        return self.prefix_contains([key]) == 1

    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        none: list[bool] = []
        return leading_true(self._guard("prefix_contains", lambda: self._exists_many(keys), none))

    def get(self, key: bytes) -> Chunk | None:
        return self.batched_get([key])[0]

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        return self._collect(keys, lambda: self._fetch_many(keys))

    def _collect(
        self, keys: Sequence[bytes], fetch: Callable[[], Sequence[tuple[Buffer, Buffer] | Chunk | None]]
    ) -> list[Chunk | None]:
        """``fetch``'s entries as chunks: ``(header, payload)`` decoded here, a ``Chunk`` a subclass
        already verified (received into the caller's memory), ``None`` absent; counted, and a
        corrupt or incomplete value removed."""
        if not keys:
            return []
        found = self._guard("get", fetch, None)
        if found is None:
            self._count_get(0, len(keys))
            return [None] * len(keys)
        out: list[Chunk | None] = []
        for k, f in zip(keys, found):
            c = f if isinstance(f, Chunk) or f is None else self._decode(k, *f)
            if f is not None and c is None:
                self.remove(k)  # corrupt or incomplete: make room for a clean rewrite
            out.append(c)
        hits = sum(c is not None for c in out)
        self._count_get(hits, len(keys) - hits)
        return out

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self.batched_put([(key, chunk)])[0]

    # -- serde ----------------------------------------------------------------------------------
    def _encode(self, key: bytes, chunk: Chunk) -> tuple[bytes, bytes | bytearray | memoryview]:
        """``(header, payload)``; with the raw codec the payload is a view of the KV itself when it
        is a contiguous CPU tensor (else of one contiguous copy), so send it before returning."""
        try:
            return serde.encode_parts(chunk, self.serde_name, key)
        except serde.SerdeError as e:
            raise TierError(f"{self.name} tier cannot store this chunk: {e}") from e

    def _decode(self, key: bytes, header: Buffer, payload: Buffer) -> Chunk | None:
        """The chunk from a stored header and payload, or ``None`` (logged, counted) if corrupt,
        incomplete or filed under another key.

        Zero-copy: after the checksum, the KV tensor is a view of the received buffer (which
        nothing else references), not a fresh allocation the caller would copy out of again.
        """
        try:
            h = serde.ChunkHeader.unpack(header)
            check_key(h, key)
            verify_payload(h, payload)
            codec = serde.codec_by_id(h.codec_id)
            if codec is None:
                raise serde.CorruptChunkError(f"unknown codec id {h.codec_id}")
            try:
                raw = codec.decompress(payload, h.raw_nbytes)
            except ValueError as e:
                raise serde.CorruptChunkError(f"{codec.name}: {e}") from e
        except serde.CorruptChunkError as e:
            with self._lock:
                self._stats.errors += 1
            log.warning(
                "%s: value for %s is corrupt or incomplete (%s); treated as a miss and deleted",
                self.breaker.name,
                key.hex(),
                e,
            )
            return None
        if not h.raw_nbytes:
            return Chunk(torch.empty(h.shape, dtype=h.dtype), h.fingerprint, h.num_tokens)
        kv = torch.frombuffer(raw, dtype=torch.uint8).view(h.dtype).view(h.shape)
        return Chunk(kv, h.fingerprint, h.num_tokens)

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
        self.breaker.close()
