"""Connecting to Redis/Valkey: parse ``remote.url`` and build a redis-py client with kvtier's rules.

The rules: every socket operation has ``timeout_s``; the client never retries (the tier's circuit
breaker decides when to try again); a cluster URL (``redis+cluster://h1:p1,h2:p2`` or a plain
host list) gives a ``RedisCluster``; and connections always use redis-py's pure-Python command
packer (``_PythonPacker`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import PythonRespSerializer
from redis.retry import Retry

from kvtier.tiers.base import TierError
from kvtier.tiers.network import redact_url


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


SOCKET_READ_BYTES = 1 << 20
"""How much redis-py's parser asks the socket for per read (its default is 64 KiB)."""


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


def connect(
    target: RedisTarget, *, username: str | None, password: str | None, timeout_s: float, max_connections: int
) -> redis.Redis | RedisCluster:
    """A client for ``target`` (no I/O yet for a single server; a cluster reads its topology)."""
    kw: dict[str, Any] = dict(
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        # NOTE: KV values are MiBs: the default 64 KiB reads cost one parser round per 64 KiB
        socket_read_size=SOCKET_READ_BYTES,
    )
    kw.update({k: v for k, v in (("username", username), ("password", password)) if v})
    if target.cluster:
        h, p = target.nodes[0]  # url= makes redis-py build node pools that honour connection_class
        return RedisCluster(
            url=f"{'rediss' if target.ssl else 'redis'}://{h}:{p}",
            startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
            connection_class=_SSLConnection if target.ssl else _Connection,
            **kw,
        )
    scheme = target.url.partition("://")[0]
    kw["connection_class"] = {"unix": _UnixConnection, "rediss": _SSLConnection}.get(scheme, _Connection)
    return redis.Redis.from_url(target.url, **kw)
