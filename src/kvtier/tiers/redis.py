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

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import PythonRespSerializer
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from kvtier import serde
from kvtier.tiers.base import Chunk, TierError
from kvtier.tiers.network import NetworkTier, leading_true, redact_url

log = logging.getLogger(__name__)

_MAX_PIPELINE_BYTES = 64 * 1024**2  # flush a batched put's pipeline every ~64 MiB
Encoded = tuple[bytes, "bytes | bytearray | memoryview"]


class _PythonPacker:
    """Always redis-py's pure-Python command packer: it sends a large (memoryview) argument as it
    is, while the hiredis packer (used whenever hiredis is installed) first copies every
    memoryview into new ``bytes`` — an extra allocation and copy of each KV payload. Replies are
    still parsed by hiredis when it is there."""

    _buffer_cutoff: int
    encoder: Any

    def _construct_command_packer(self, packer: Any) -> PythonRespSerializer:
        return PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)


class _Connection(_PythonPacker, redis.Connection):
    pass


class _SSLConnection(_PythonPacker, redis.SSLConnection):
    pass


class _UnixConnection(_PythonPacker, redis.UnixDomainSocketConnection):
    pass


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``remote.url``: one server (``url`` for redis-py) or cluster ``nodes``."""

    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    ssl: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def cluster(self) -> bool:
        return bool(self.nodes)


def parse_redis_url(url: str) -> RedisTarget:
    """``redis://``, ``rediss://``, ``unix://``, ``valkey(s)://`` = one server; ``*+cluster://`` or a
    comma-separated host list = a cluster. Raises ``TierError`` naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise TierError(f"remote.url {redact_url(url)!r} has no scheme (want redis://host:port)")
    base, _, cluster_flag = scheme.partition("+")
    if base not in ("redis", "rediss", "valkey", "valkeys", "unix") or cluster_flag not in ("", "cluster"):
        raise TierError(f"remote.url {redact_url(url)!r}: unsupported scheme {scheme!r}")
    tls = base in ("rediss", "valkeys")
    plain = {"valkey": "redis", "valkeys": "rediss"}.get(base, base)
    netloc = rest.split("/", 1)[0]
    if base == "unix" or (not cluster_flag and "," not in netloc):
        return RedisTarget(f"{plain}://{rest}", ssl=tls)
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, pw = userinfo.partition(":")
    nodes = []
    for hp in hosts.split(","):
        host, _, port = hp.strip().rpartition(":")
        if not host or not port.isdigit():
            raise TierError(f"remote.url {redact_url(url)!r}: cluster node {hp!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return RedisTarget(url, tuple(nodes), tls, unquote(user) or None, unquote(pw) or None)


class RedisTier(NetworkTier):
    """Chunks in Redis/Valkey. Thread-safe (redis-py pools connections per thread of use)."""

    def __init__(self, url: str, *, key_prefix: str = "kvtier", serde_name: str = "raw", timeout_s: float = 2.0,
                 ttl_s: float = 0.0, max_value_bytes: int = 16 * 1024**2, username: str = "",
                 password: str = "", failure_threshold: int = 3, retry_backoff_s: float = 0.5,
                 max_connections: int = 64, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if timeout_s <= 0 or ttl_s < 0 or max_value_bytes < 4096:
            raise TierError(f"redis tier: need timeout_s > 0, ttl_s >= 0, max_value_bytes >= 4096; got "
                            f"{timeout_s}, {ttl_s}, {max_value_bytes}")  # fmt: skip
        self.target = parse_redis_url(url)
        super().__init__("redis", url, serde_name=serde_name, failure_types=(redis.RedisError, RedisClusterException, OSError), refusal_types=(redis.ResponseError,),
                         failure_threshold=failure_threshold, retry_backoff_s=retry_backoff_s,
                         clock=clock)  # fmt: skip
        self.key_prefix = key_prefix
        self.max_value_bytes = max_value_bytes
        self._px = int(ttl_s * 1000) or None
        self._kw: dict[str, Any] = dict(
            username=username or self.target.username,
            password=password or self.target.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # the breaker decides about retrying, not the client
        )
        base = self.target.url.partition("://")[0]
        self._kw["connection_class"] = {"unix": _UnixConnection, "rediss": _SSLConnection}.get(
            base, _Connection
        )
        self._max_connections = max_connections
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
                kw = {k: v for k, v in self._kw.items() if v is not None}
                if self.target.cluster:
                    nodes = [ClusterNode(h, p) for h, p in self.target.nodes]
                    h, p = self.target.nodes[0]  # url= makes node pools take connection_class
                    self._client = RedisCluster(url=f"{'rediss' if self.target.ssl else 'redis'}://{h}:{p}",
                                                startup_nodes=nodes, max_connections=self._max_connections,
                                                **kw)  # fmt: skip
                else:
                    self._client = redis.Redis.from_url(
                        self.target.url, max_connections=self._max_connections, **kw
                    )
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

    def _pipe(self) -> Any:
        return self._r().pipeline(transaction=False)

    # -- keys -----------------------------------------------------------------------------------
    def _rk(self, key: bytes) -> str:
        return f"{self.key_prefix}:{{{key.hex()}}}"

    # -- Tier API -------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return bool(self._guard("contains", lambda: self._r().exists(self._rk(key)), 0))

    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0

        def run() -> list[Any]:
            p = self._pipe()
            for k in keys:
                p.exists(self._rk(k))
            return list(p.execute())

        none: list[Any] = []
        found = self._guard("prefix_contains", run, none)
        return leading_true(found)

    def get(self, key: bytes) -> Chunk | None:
        return self.batched_get([key])[0]

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        """Header + part 0 of every key in one round trip; other parts of split chunks in a second."""
        if not keys:
            return []
        found = self._guard("get", lambda: self._fetch(keys), None)
        if found is None:
            self._count_get(0, len(keys))
            return [None] * len(keys)
        out: list[Chunk | None] = []
        for k, f in zip(keys, found):
            c = None if f is None else self._decode(k, *f)
            if f is not None and c is None:
                self.remove(k)  # corrupt or incomplete: make room for a clean rewrite
            out.append(c)
        hits = sum(c is not None for c in out)
        self._count_get(hits, len(keys) - hits)
        return out

    def _fetch(self, keys: Sequence[bytes]) -> list[tuple[bytes, bytes | bytearray] | None]:
        """``(header, payload)`` per key, ``None`` when absent; ``(b"", b"")`` when incomplete."""
        p = self._pipe()
        for k in keys:
            p.get(self._rk(k))
            p.get(self._rk(k) + ":0")
        replies: list[Any] = list(p.execute())
        out: list[tuple[bytes, bytes | bytearray] | None] = []
        more: list[tuple[int, int]] = []  # (index, parts) of split chunks
        for i in range(len(keys)):
            head, part0 = replies[2 * i], replies[2 * i + 1]
            if head is None:
                out.append(None)
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

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self.batched_put([(key, chunk)])[0]

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

    def _delete_each(self, names: list[str]) -> None:
        p = self._pipe()
        for n in names:
            p.delete(n)
        p.execute()

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


def _nbytes(e: Encoded) -> int:
    return len(e[0]) + len(e[1])


def _payload_size(head: bytes) -> int | None:
    """The payload size a stored header promises (``None`` if it is not a valid header)."""
    try:
        return serde.ChunkHeader.unpack(head).payload_nbytes
    except serde.CorruptChunkError:
        return None
