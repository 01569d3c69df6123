"""The Redis / Valkey tier: chunks as values in a Redis-protocol store, standalone or cluster.

Keys: ``{prefix}:{<hex digest>}`` holds the chunk's 128-byte ``serde`` header, and
``{prefix}:{<hex digest>}:0``, ``:1``, ... hold its payload in parts of at most
``max_value_bytes`` (one part for a normal chunk). The digest already folds in the namespace
(model, dtype, shape, tp, salt), so every engine process with the same namespace and the same
store sees the same keys. The ``{...}`` is a cluster hash tag: a chunk's keys share one slot
(one node, one command), while different chunks spread over the cluster's slots.

Why header and payload live in separate keys: both then go out as separate protocol arguments
straight from the KV tensor's memory — no client-side concatenation (a fresh 8 MiB buffer costs
more in page faults than the copy), and no server-side ``APPEND`` (which reallocates and copies).

Atomicity: all keys of a chunk are written by one ``MSETNX`` — all or nothing, and only if none
exists — so a reader never sees a half-written value, and of two concurrent writers the first
wins without leaving garbage. A reader fetches the header and part 0 in one round trip (and the
remaining parts, for a split chunk, in a second). A chunk found incomplete (a part evicted or
expired) or corrupt is deleted, so the next store can write it again.

Every call is bounded by ``timeout_s`` (socket connect/read/write timeouts, no client retries)
and guarded by the circuit breaker (``network``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
import torch
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from kvtier import serde
from kvtier.chunk import Chunk
from kvtier.serde.base import check_key
from kvtier.serde.codec import Buffer
from kvtier.tiers.base import TierError
from kvtier.tiers.network import NetworkTier
from kvtier.tiers.redis_bulk import Received, get_many
from kvtier.tiers.redis_client import connect, parse_redis_url

log = logging.getLogger(__name__)

_MAX_PIPELINE_BYTES = 64 * 1024**2  # flush a batched put's pipeline every ~64 MiB
Encoded = tuple[bytes, "bytes | bytearray | memoryview"]


class RedisTier(NetworkTier):
    """Chunks in Redis/Valkey. Thread-safe (redis-py pools connections per thread of use)."""

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "kvtier",
        serde_name: str = "raw",
        timeout_s: float = 2.0,
        ttl_s: float = 0.0,
        max_value_bytes: int = 16 * 1024**2,
        username: str = "",
        password: str = "",
        failure_threshold: int = 3,
        retry_backoff_s: float = 0.5,
        retry_backoff_max_s: float = 5.0,
        max_connections: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0 or ttl_s < 0 or max_value_bytes < 4096:
            raise TierError(
                f"redis tier: need timeout_s > 0, ttl_s >= 0, max_value_bytes >= 4096; got "
                f"{timeout_s}, {ttl_s}, {max_value_bytes}"
            )
        self.target = parse_redis_url(url)
        super().__init__(
            "redis",
            url,
            serde_name=serde_name,
            failure_types=(redis.RedisError, RedisClusterException, OSError),
            refusal_types=(redis.ResponseError,),
            failure_threshold=failure_threshold,
            retry_backoff_s=retry_backoff_s,
            retry_backoff_max_s=retry_backoff_max_s,
            timeout_s=timeout_s,
            clock=clock,
        )
        self.key_prefix = key_prefix
        self.max_value_bytes = max_value_bytes
        self._px = int(ttl_s * 1000) or None
        self._connect = functools.partial(
            connect,
            self.target,
            username=username or self.target.username,
            password=password or self.target.password,
            timeout_s=timeout_s,
            max_connections=max_connections,
        )
        self._client: redis.Redis | RedisCluster | None = None
        self._client_lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------------
    def _r(self) -> redis.Redis | RedisCluster:
        """The client, created on first use: a store that is down at start-up is a miss, not an error."""
        c = self._client
        if c is not None:
            return c
        with self._client_lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _reset_connection(self) -> None:
        """Forget pooled sockets (and cluster topology): the next probe starts afresh."""
        with self._client_lock:
            c, self._client = self._client, None
        if c is not None:
            try:
                c.close()
            except (redis.RedisError, OSError) as e:
                log.debug("redis tier: closing the old client: %s", e)

    def _ping(self) -> None:
        self._r().ping()

    def _pipe(self) -> Any:
        return self._r().pipeline(transaction=False)

    # -- keys -----------------------------------------------------------------------------------
    def _rk(self, key: bytes) -> str:
        return f"{self.key_prefix}:{{{key.hex()}}}"

    # -- Tier API (reads: NetworkTier.batched_get over _fetch_many) ------------------------------
    def _exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether *every* key of each chunk is present (header and all payload parts).

        Under ``allkeys-lru`` Redis evicts keys one by one, so a header can outlive its payload;
        checking it alone made ``lookup`` promise chunks ``retrieve`` could not read. One round
        trip reads each 128-byte header and the length of part 0, which answers for every chunk
        stored in one part (all up to ``max_value_bytes``); a split chunk's other parts are
        counted with one ``EXISTS`` each in a second round trip, for those chunks only.
        """
        p = self._pipe()
        for k in keys:
            p.get(self._rk(k))
            p.strlen(self._rk(k) + ":0")
        replies: list[Any] = list(p.execute())
        out: list[bool] = []
        split: list[tuple[int, int]] = []  # (index, parts)
        for i in range(len(keys)):
            head, part0 = replies[2 * i], int(replies[2 * i + 1])
            total = None if head is None else _payload_size(head)
            # NOTE: an absent part 0 reads as length 0, like the one empty part of an empty payload
            ok = total is not None and (total == 0 or 0 < part0 <= total)
            out.append(ok)
            if ok and total and part0 < total:
                split.append((i, -(-total // part0)))
        if split:
            p = self._pipe()
            for i, n in split:
                p.exists(*[f"{self._rk(keys[i])}:{j}" for j in range(1, n)])
            for (i, n), found in zip(split, p.execute()):
                out[i] = int(found) == n - 1
        return out

    def batched_get_into(
        self, keys: Sequence[bytes], into: Sequence[torch.Tensor | None]
    ) -> list[Chunk | None]:
        """``batched_get`` receiving each raw, one-part value straight into ``into[i]`` (standalone
        Redis): the reply is read into the destination's contiguous slabs and hashed as it lands,
        its header (read just before it, same pipeline) checked first, so the chunk returned *is*
        ``into[i]`` and the engine's copy into its output has nothing left to do. Anything else
        (a codec, a split value, another shape) is received and decoded as ``batched_get`` does."""
        if not isinstance(self._r(), redis.Redis) or all(t is None for t in into):
            return self.batched_get(keys)
        return self._collect(keys, lambda: self._fetch_many(keys, into))

    def _fetch_many(
        self, keys: Sequence[bytes], into: Sequence[torch.Tensor | None] | None = None
    ) -> list[tuple[Buffer, Buffer] | Chunk | None]:
        """``(header, payload)`` per key, ``None`` when absent; ``(b"", b"")`` when incomplete; a
        ``Chunk`` viewing ``into[i]`` when its value was received and verified there.

        Standalone: values are read off the socket into their final buffers (``redis_bulk``);
        a cluster goes through redis-py's pipeline (one per node)."""
        r = self._r()
        names = [name for k in keys for name in (self._rk(k), self._rk(k) + ":0")]
        replies: list[Any]
        if isinstance(r, redis.Redis):
            dest = None if into is None else functools.partial(_slabs_for, into)
            replies = list(get_many(r, names, dest))
        else:
            p = self._pipe()
            for name in names:
                p.get(name)
            replies = list(p.execute())
        out: list[tuple[Buffer, Buffer] | Chunk | None] = []
        more: list[tuple[int, int]] = []  # (index, parts) of split chunks
        for i in range(len(keys)):
            head, part0 = replies[2 * i], replies[2 * i + 1]
            if head is None:
                out.append(None)
                continue
            if isinstance(part0, Received):
                t = into[i] if into is not None else None
                assert t is not None, "a reply lands in place only where into gave a tensor"
                out.append(_received_chunk(keys[i], head, part0, t))
                continue
            total = _payload_size(head)
            if part0 is None or total is None or (total and not part0) or len(part0) > total:
                out.append((b"", b""))  # incomplete or corrupt: decode will reject it
                continue
            out.append((head, part0))
            if len(part0) < total:
                more.append((i, -(-total // len(part0))))
        if more:
            p = self._pipe()
            for i, n in more:
                for j in range(1, n):
                    p.get(f"{self._rk(keys[i])}:{j}")
            rest: list[Any] = list(p.execute())
            pos = 0
            for i, n in more:
                mine, pos = rest[pos : pos + n - 1], pos + n - 1
                head, part0 = out[i]  # type: ignore[misc]
                if any(x is None for x in mine):  # a part expired or was evicted: the chunk is gone
                    out[i] = (b"", b"")
                    continue
                joined = bytearray(part0)
                for x in mine:
                    joined += x
                out[i] = (head, joined)
        return out

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        """One pipeline per ~64 MiB; see ``_write`` for how a value becomes visible atomically."""
        results: list[bool] = []
        batch: list[tuple[bytes, Encoded]] = []
        size = 0
        for key, chunk in items:
            enc = self._encode(key, chunk)  # views of the chunk's memory: sent before we return
            batch.append((key, enc))
            size += _nbytes(enc)
            if size >= _MAX_PIPELINE_BYTES:
                results += self._put_batch(batch)
                batch, size = [], 0
        if batch:
            results += self._put_batch(batch)
        return results

    def _put_batch(self, batch: list[tuple[bytes, Encoded]]) -> list[bool]:
        ok = self._guard("put", lambda: self._write(batch), None)
        if ok is None:
            self._count_put(0, 0, len(batch))
            return [False] * len(batch)
        self._count_put(sum(ok), sum(_nbytes(e) for (_, e), w in zip(batch, ok) if w), 0)
        return [True] * len(batch)

    def _write(self, batch: list[tuple[bytes, Encoded]]) -> list[bool]:
        """Whether each item was newly written (``False``: a copy was already there).

        One ``MSETNX`` per chunk (header key + payload parts, zero-copy views of the KV), plus
        ``PEXPIRE`` per key when a TTL is set, all in one pipeline. ``MSETNX`` refusing although
        the header key is absent means stale parts of an evicted chunk block it: they are
        deleted and the write is retried once.
        """
        p = self._pipe()
        plan: list[tuple[bytes, list[str], list[Any], int]] = []  # key, names, values, MSETNX reply
        n_cmds = 0
        for key, (header, payload) in batch:
            rk = self._rk(key)
            step = self.max_value_bytes
            parts = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
            names = [rk] + [f"{rk}:{j}" for j in range(len(parts))]
            values = [header, *parts]
            self._msetnx(p, names, values)
            p.exists(rk)
            plan.append((key, names, values, n_cmds))
            n_cmds += 2 + (len(names) if self._px else 0)  # MSETNX, [PEXPIRE per key], EXISTS
        replies: list[Any] = list(p.execute())
        written = {key: bool(replies[i]) for key, _, _, i in plan}
        exists = {key: bool(replies[i + 1 + (len(names) if self._px else 0)]) for key, names, _, i in plan}
        stale = [
            (key, names, values) for key, names, values, _ in plan if not written[key] and not exists[key]
        ]
        if stale:
            p = self._pipe()
            for _, names, values in stale:
                for n in names[1:]:
                    p.delete(n)
                self._msetnx(p, names, values)
            again: list[Any] = list(p.execute())
            pos = 0
            for key, names, _ in stale:
                pos += len(names) - 1
                written[key] = bool(again[pos])
                pos += 1 + (len(names) if self._px else 0)
        return [written[k] for k, _ in batch]

    def _msetnx(self, p: Any, names: list[str], values: list[Any]) -> None:
        args: list[Any] = []
        for n, v in zip(names, values):
            args += [n, v]
        p.execute_command("MSETNX", *args)  # (redis-py's cluster pipeline blocks .msetnx; one slot here)
        if self._px:
            for n in names:
                p.pexpire(n, self._px)

    def remove(self, key: bytes) -> bool:
        def run() -> bool:
            rk = self._rk(key)
            p = self._pipe()
            p.get(rk)
            p.strlen(f"{rk}:0")
            head, part0 = p.execute()
            total = _payload_size(head) if head is not None else None
            n = -(-total // part0) if total and part0 else 1
            p = self._pipe()
            for name in [rk] + [f"{rk}:{j}" for j in range(n)]:
                p.delete(name)
            removed = bool(p.execute()[0])
            if removed:
                self._count_remove(len(head) + (total or 0))
            return removed

        return self._guard("remove", run, False)

    def close(self) -> None:
        super().close()
        self._reset_connection()


def _slabs_for(into: Sequence[torch.Tensor | None], j: int, replies: list[Any]) -> list[memoryview] | None:
    """Where reply ``j`` may land: for a key's first payload part whose header (the reply before
    it) promises a raw, one-part payload of ``into``'s shape and dtype, ``into``'s bytes as
    contiguous slabs in order; else ``None``. Checked before a payload byte is read."""
    if j % 2 == 0:
        return None
    t = into[j // 2]
    head = replies[j - 1]
    if t is None or head is None or t.device.type != "cpu" or t.dim() < 2:
        return None
    try:
        h = serde.ChunkHeader.unpack(head)
    except serde.CorruptChunkError:
        return None
    if h.codec_id != serde.get_codec("raw").id or h.shape != tuple(t.shape) or h.dtype != t.dtype:
        return None
    if h.raw_nbytes != h.payload_nbytes or h.payload_nbytes != t.numel() * t.element_size():
        return None
    rows = [t] if t.is_contiguous() else [t[a, b] for a in range(t.shape[0]) for b in range(t.shape[1])]
    if not all(r.is_contiguous() for r in rows):
        return None
    return [memoryview(r.reshape(-1).view(torch.uint8).numpy()).cast("B") for r in rows]  # type: ignore[arg-type]


def _received_chunk(
    key: bytes, head: Buffer, got: Received, t: torch.Tensor
) -> Chunk | tuple[Buffer, Buffer]:
    """The chunk whose payload ``get_many`` received into ``t``, once its header's key, length and
    checksum agree; ``(b"", b"")`` (corrupt: the caller counts, logs and removes it) otherwise."""
    try:
        h = serde.ChunkHeader.unpack(head)
        check_key(h, key)
    except serde.CorruptChunkError:
        return (b"", b"")
    if got.nbytes != h.payload_nbytes or got.checksum != h.payload_checksum:
        return (b"", b"")
    return Chunk(t, h.fingerprint, h.num_tokens)


def _nbytes(e: Encoded) -> int:
    return len(e[0]) + len(e[1])


def _payload_size(head: bytes) -> int | None:
    """The payload size a stored header promises (``None`` if it is not a valid header)."""
    try:
        return serde.ChunkHeader.unpack(head).payload_nbytes
    except serde.CorruptChunkError:
        return None
