"""The CacheEngine(s) behind the vLLM connector, per process; its config from vLLM's extra config.

vLLM builds the connector twice (scheduler role, worker role). When both run in one process
(vLLM's ``uni`` executor) they must see one cache, so engines are shared per (vLLM instance,
namespace) through ``shared_engine``. When the workers run in other processes, the scheduler gets
an engine of its own that reads only what it can reach: a ``MirrorTier`` of the keys the workers
report, plus the remote tier (``remote.url``) if one is configured. Local tiers (CPU memory, the
disk directory, which one process locks) belong to the worker.

Disaggregated prefill/decode (``role_config``): a ``kv_producer`` and a ``kv_consumer`` are
different vLLM instances, so the KV must go through a tier both reach (``remote.url``: the
kvtier daemon on one host, a daemon over TCP or Redis across hosts); without one the start
fails. The producer writes that tier directly (its local tiers are turned off): it never loads,
so they would serve nothing, and a write-through queue below them would let the consumer look
before the KV has landed. With the shared tier on top, a save has reached it when the step that
computed the KV returns, so the prefill request's answer means "stored".

No vLLM import here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvtier.chunk import dtype_from_name
from kvtier.config import Config, ConfigError
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace

from .vllm_plan import ConnectorError, Role
from .vllm_worker import ConnectorStats

log = logging.getLogger(__name__)


def config_from_extra(extra: dict[str, Any]) -> Config:
    """A kvtier Config from ``kv_connector_extra_config`` (file + ``kvtier.section.field`` overrides)."""
    bad = sorted(k for k in extra if not k.startswith("kvtier."))
    if bad:
        raise ConfigError(
            f"kv_connector_extra_config: unknown keys {bad}; use 'kvtier.config_file' or 'kvtier.<section>.<field>'"
        )
    path = extra.get("kvtier.config_file")
    overrides = {k.removeprefix("kvtier."): v for k, v in extra.items() if k != "kvtier.config_file"}
    return Config.load(path, **overrides)


def role_config(config: Config, role: Role) -> Config:
    """``config`` as an instance of ``role`` runs it (see the module docstring)."""
    if role.loads and role.saves:
        return config
    if not config.remote.url:
        raise ConnectorError(
            f"kv_role {role.name!r} moves KV between vLLM instances: set kvtier.remote.url to a tier both "
            "reach (kvtier://HOST:PORT for the kvtier daemon, or redis://HOST:PORT)"
        )
    if role.loads:
        return config
    if config.cpu.enabled or config.disk.enabled:
        log.info(
            "kvtier: kv_producer writes the shared tier directly; its local cpu/disk tiers are off "
            "(it never loads from them)"
        )
    return dataclasses.replace(
        config,
        cpu=dataclasses.replace(config.cpu, enabled=False),
        disk=dataclasses.replace(config.disk, enabled=False),
    )


@dataclass
class Shared:
    engine: CacheEngine
    stats: ConnectorStats = field(default_factory=ConnectorStats)
    mirror: bool = False
    """The engine is a key mirror of workers in other processes (``CacheEngine(key_mirror=...)``)."""
    users: int = 0
    reported: dict[str, float] = field(default_factory=dict)
    """``stats`` as last reported to vLLM (``vllm_stats.take_delta``: each count reported once)."""
    drains: list[Callable[[float | None], bool]] = field(default_factory=list)
    """The workers' ``drain_saves`` (background saves: ``wait_saved``)."""


_SHARED: dict[tuple[str, bytes, str], Shared] = {}
_LOCK = threading.Lock()


def shared_engine(instance: str, role: str, ns: Namespace, build: Callable[[], Shared]) -> Shared:
    """The engine of (vLLM instance, namespace, ``role``) in this process, built on first use.

    ``role`` is ``"both"`` for an engine the scheduler and worker share, else the role's name.
    """
    key = (instance, ns.digest(), role)
    with _LOCK:
        sh = _SHARED.get(key)
        if sh is None:
            sh = _SHARED[key] = build()
        sh.users += 1
        return sh


def release(instance: str, role: str, ns: Namespace) -> None:
    key = (instance, ns.digest(), role)
    with _LOCK:
        sh = _SHARED.get(key)
        if sh is None:
            return
        sh.users -= 1
        if sh.users <= 0:
            del _SHARED[key]
            sh.engine.close()


def connector_stats(instance: str) -> dict[str, float]:
    """Counters of the connector(s) of vLLM instance ``instance`` (its ``engine_id``) in this process."""
    with _LOCK:
        out: dict[str, float] = {}
        for (inst, _, _), sh in _SHARED.items():
            if inst == instance:
                for k, v in sh.stats.to_dict().items():
                    out[k] = out.get(k, 0) + v
        return out


def wait_saved(instance: str, timeout_s: float | None = 60.0) -> bool:
    """Wait until the background saves of ``instance``'s workers in this process have ended
    (their chunks stored, or failed); ``False`` if ``timeout_s`` passed first. Saves run after
    the step that computed the KV (``vllm.async_save``): call this before expecting a request
    that just finished to be a kvtier hit (tests, benchmarks)."""
    with _LOCK:
        drains = [d for (inst, _, _), sh in _SHARED.items() if inst == instance for d in sh.drains]
    return all([d(timeout_s) for d in drains])


def find_engine(instance: str) -> CacheEngine | None:
    """The CacheEngine holding ``instance``'s KV in this process (tests and tools); None if none."""
    with _LOCK:
        found = [(r, sh.engine) for (inst, _, r), sh in _SHARED.items() if inst == instance]
    return next((e for r, e in found if r != "scheduler"), None)


def local_engine(config: Config, ns: Namespace) -> Shared:
    """An engine over the configured tiers (the worker's, or both roles' in one process)."""
    return Shared(CacheEngine(config, namespace=ns))


def scheduler_engine(config: Config, ns: Namespace) -> Shared:
    """The scheduler's engine when workers are other processes: a key mirror (+ the remote tier)."""
    sched_cfg = dataclasses.replace(config, cpu=dataclasses.replace(config.cpu, enabled=False))
    return Shared(CacheEngine(sched_cfg, namespace=ns, key_mirror=mirror_capacity(config, ns)), mirror=True)


def mirror_capacity(config: Config, ns: Namespace) -> int:
    """About how many chunks the workers' local tiers hold (the mirror forgets beyond that)."""
    layers, heads, dim = ns.kv_shape
    elem = dtype_from_name(ns.kv_dtype).itemsize
    chunk_bytes = layers * 2 * config.chunk.chunk_tokens * heads * dim * elem
    local = (config.cpu.max_bytes if config.cpu.enabled else 0) + (
        config.disk.max_disk_bytes if config.disk.enabled else 0
    )
    return max(1024, local // max(chunk_bytes, 1))
