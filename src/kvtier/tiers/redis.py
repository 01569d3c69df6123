"""The Redis / Valkey tier: chunks as values in a Redis-protocol store, standalone or cluster.

Keys: ``{prefix}:{<hex digest>}``. The digest already folds in the namespace (model, dtype,
shape, tp, salt), so every engine process with the same namespace and the same store sees the
same keys. The ``{...}`` is a cluster hash tag: a value and all its parts share one slot (one
node, one pipeline), while different chunks spread over the cluster's slots.

Values: a ``serde`` blob (magic ``KVTC``), or — when the blob is larger than ``max_value_bytes``
— a *manifest* (magic ``KVTM``: part count, total size, a random write id) whose parts live at
``{prefix}:{<hex>}:<write id>:<i>``. Parts are written first and the manifest last, in one
pipeline on one connection (Redis executes it in order), so a reader that finds the manifest
finds a complete value; the write id keeps two concurrent writers' parts apart.

Writes are ``SET ... NX``: a key's content never changes (content-addressed), so the first
writer wins and a loser deletes its own parts — no orphaned parts, no torn overwrite. A value
that fails its checksum on read is deleted, so the next store repairs it.

Every call is bounded by ``timeout_s`` (socket connect/read/write timeouts, no client retries)
and guarded by the circuit breaker (``network``).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from kvtier import serde
from kvtier.tiers.base import Chunk, TierError
from kvtier.tiers.network import NetworkTier, leading_true, redact_url

log = logging.getLogger(__name__)

_MANIFEST = struct.Struct("<4sB3xIQ16s")  # magic, version, parts, total bytes, write id (hex)
_MAGIC = b"KVTM"
_PEEK = max(serde.HEADER_BYTES, _MANIFEST.size) - 1  # GETRANGE end: enough to size any value
_MAX_PIPELINE_BYTES = 64 * 1024**2  # flush a batched put's pipeline every ~64 MiB


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
        super().__init__("redis", url, serde_name=serde_name, failure_types=(redis.RedisError, OSError),
                         failure_threshold=failure_threshold, retry_backoff_s=retry_backoff_s,
                         clock=clock)  # fmt: skip
        self.key_prefix = key_prefix
        self.max_value_bytes = max_value_bytes
        self._px = int(ttl_s * 1000) or None
        self._parts_px = (
            int((ttl_s + max(1.0, ttl_s * 0.1)) * 1000) if ttl_s else None
        )  # outlive the manifest
        self._kw: dict[str, Any] = dict(
            username=username or self.target.username,
            password=password or self.target.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # the breaker decides about retrying, not the client
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
                    self._client = RedisCluster(startup_nodes=nodes, ssl=self.target.ssl,
                                                max_connections=self._max_connections, **kw)  # fmt: skip
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

    def _part_keys(self, key: bytes, write_id: str, n: int) -> list[str]:
        return [f"{self._rk(key)}:{write_id}:{i}" for i in range(n)]

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
        """Two round trips at most: every value (or manifest), then every part of the split ones."""
        if not keys:
            return []
        blobs = self._guard("get", lambda: self._fetch(keys), None)
        if blobs is None:
            self._count_get(0, len(keys))
            return [None] * len(keys)
        out: list[Chunk | None] = []
        corrupt: list[bytes] = []
        for k, blob in zip(keys, blobs):
            c = None if blob is None else self._decode(k, blob)
            if blob is not None and c is None:
                corrupt.append(k)
            out.append(c)
        for k in corrupt:
            self.remove(k)
        hits = sum(c is not None for c in out)
        self._count_get(hits, len(keys) - hits)
        return out

    def _fetch(self, keys: Sequence[bytes]) -> list[bytes | bytearray | None]:
        p = self._pipe()
        for k in keys:
            p.get(self._rk(k))
        vals: list[Any] = list(p.execute())
        split = [(i, _manifest(v)) for i, v in enumerate(vals) if v is not None and v[:4] == _MAGIC]
        if split:
            p = self._pipe()
            for i, m in split:
                for pk in self._part_keys(keys[i], m[2], m[0]) if m else ():
                    p.get(pk)
            parts: list[Any] = list(p.execute())
            pos = 0
            for i, m in split:
                if m is None:
                    vals[i] = b"corrupt manifest"
                    continue
                mine, pos = parts[pos : pos + m[0]], pos + m[0]
                if any(x is None for x in mine):  # a part expired or was evicted: the value is gone
                    vals[i] = None
                else:
                    joined = bytearray(m[1])
                    off = 0
                    for x in mine:
                        joined[off : off + len(x)] = x
                        off += len(x)
                    vals[i] = joined if off == m[1] else b"bad part sizes"
        return vals

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self.batched_put([(key, chunk)])[0]

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        """Pipelined ``SET NX``; split values write their parts first, then the manifest."""
        results: list[bool] = []
        batch: list[tuple[bytes, bytes | bytearray]] = []
        size = 0
        for key, chunk in items:
            blob = self._encode(key, chunk)
            batch.append((key, blob))
            size += len(blob)
            if size >= _MAX_PIPELINE_BYTES:
                results += self._put_batch(batch)
                batch, size = [], 0
        if batch:
            results += self._put_batch(batch)
        return results

    def _put_batch(self, batch: list[tuple[bytes, bytes | bytearray]]) -> list[bool]:
        ok = self._guard("put", lambda: self._write(batch), None)
        if ok is None:
            self._count_put(0, 0, len(batch))
            return [False] * len(batch)
        new = [written for written, _ in ok]
        self._count_put(sum(new), sum(len(b) for (_, b), w in zip(batch, new) if w), 0)
        return [present for _, present in ok]

    def _write(self, batch: list[tuple[bytes, bytes | bytearray]]) -> list[tuple[bool, bool]]:
        """``(newly written, present now)`` per item."""
        big = [k for k, b in batch if len(b) > self.max_value_bytes]
        exists: set[bytes] = set()
        if big:  # do not ship megabytes of parts for a value that is already there
            p = self._pipe()
            for k in big:
                p.exists(self._rk(k))
            exists = {k for k, e in zip(big, p.execute()) if e}
        p = self._pipe()
        plan: list[tuple[bytes, list[str]]] = []  # per item: key, its part keys (to undo)
        for key, blob in batch:
            if key in exists:
                continue
            if len(blob) <= self.max_value_bytes:
                p.set(self._rk(key), blob, nx=True, px=self._px)
                plan.append((key, []))
                continue
            step = self.max_value_bytes
            n = -(-len(blob) // step)
            write_id = os.urandom(8).hex()
            pks = self._part_keys(key, write_id, n)
            mv = memoryview(blob)
            for i, pk in enumerate(pks):
                p.set(pk, mv[i * step : (i + 1) * step], px=self._parts_px)
            p.set(self._rk(key), _MANIFEST.pack(_MAGIC, 1, n, len(blob), write_id.encode()), nx=True,
                  px=self._px)  # fmt: skip
            plan.append((key, pks))
        replies: list[Any] = list(p.execute()) if plan else []
        written: dict[bytes, bool] = {}
        undo: list[str] = []
        pos = 0
        for key, pks in plan:
            pos += len(pks)
            written[key] = bool(replies[pos])  # the value's (or manifest's) SET NX
            pos += 1
            if pks and not written[key]:
                undo += pks  # another writer's manifest won; ours is garbage
        if undo:
            self._delete_each(undo)
        return [(written.get(k, False), True) for k, _ in batch]

    def _delete_each(self, names: list[str]) -> None:
        p = self._pipe()
        for n in names:
            p.delete(n)
        p.execute()

    def remove(self, key: bytes) -> bool:
        def run() -> bool:
            rk = self._rk(key)
            head = bytes(self._r().getrange(rk, 0, _PEEK))  # type: ignore[arg-type]
            if not head:
                return False
            p = self._pipe()
            p.delete(rk)
            m = _manifest(head) if head[:4] == _MAGIC else None
            for pk in self._part_keys(key, m[2], m[0]) if m else ():
                p.delete(pk)
            removed = bool(p.execute()[0])
            if removed:
                self._count_remove(m[1] if m else _blob_size(head))
            return removed

        return self._guard("remove", run, False)

    def close(self) -> None:
        super().close()
        self._reset_connection()


def _manifest(v: bytes | bytearray) -> tuple[int, int, str] | None:
    """``(parts, total bytes, write id)`` of a manifest value, ``None`` if it is malformed."""
    if len(v) < _MANIFEST.size:
        return None
    magic, version, n, total, wid = _MANIFEST.unpack_from(v)
    if magic != _MAGIC or version != 1 or not 0 < n <= 1 << 20:
        return None
    try:
        return n, total, wid.decode("ascii")
    except UnicodeDecodeError:
        return None


def _blob_size(head: bytes) -> int:
    try:
        return serde.ChunkHeader.unpack(head).total_nbytes
    except serde.CorruptChunkError:
        return len(head)
