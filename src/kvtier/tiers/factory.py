"""Build the tier list a Config asks for, fastest first.

Tiers are chosen by explicit config sections (``cpu``, ``disk``, ``remote.url`` scheme), never
by class-name strings.
"""

from __future__ import annotations

from typing import Any

from kvtier.config import Config, FaultConfig, RemoteConfig
from kvtier.memory import should_pin
from kvtier.tiers.base import Tier, TierError
from kvtier.tiers.cpu import CPUTier


def build_tiers(config: Config) -> list[Tier]:
    """The tiers of ``config`` in lookup order (cpu, disk, remote)."""
    tiers: list[Tier] = []
    if config.cpu.enabled:
        tiers.append(
            CPUTier(
                config.cpu.max_bytes,
                policy=config.cpu.eviction_policy,
                pin_memory=should_pin(config.cpu.pin_memory),
                pin_timeout_s=config.cpu.pin_timeout_s,
            )
        )
    if config.disk.enabled:
        from kvtier.tiers.disk import DiskTier

        d = config.disk
        tiers.append(
            DiskTier(
                d.path,
                d.max_disk_bytes,
                policy=d.eviction_policy,
                durability=d.durability,
                io_threads=d.io_threads,
                read_buffer_bytes=d.read_buffer_bytes,
                codec=d.serde,
            )
        )
    if config.remote.url:
        tiers.append(build_remote_tier(config.remote, config.server.auth_token_file))
    if not tiers:
        raise TierError("no tier enabled: enable cpu, disk or set remote.url")
    if config.fault.wrapped:
        tiers = [_with_faults(t, config.fault) for t in tiers]
    return tiers


def _with_faults(tier: Tier, f: FaultConfig) -> Tier:
    """``tier`` wrapped in a ``FaultTier`` when ``fault.tiers`` names its kind."""
    kind = {"cpu": "cpu", "disk": "disk"}.get(tier.name, "remote")
    if kind not in f.wrapped:
        return tier
    from kvtier.tiers.fault import FaultSpec, FaultTier

    spec = FaultSpec(
        latency_s=f.latency_s,
        error_rate=f.error_rate,
        hang_rate=f.hang_rate,
        hang_s=f.hang_s,
        corrupt_rate=f.corrupt_rate,
        torn_rate=f.torn_rate,
        full_rate=f.full_rate,
        seed=f.seed,
    )
    return FaultTier(tier, spec)


def build_remote_tier(remote: RemoteConfig, token_file: str = "") -> Tier:
    """The tier for ``remote.url``'s scheme: Redis/Valkey (standalone, cluster), S3, Mooncake or the daemon.

    The client modules are imported here so that ``redis``/``boto3`` stay optional extras.
    """
    scheme = remote.url.partition("://")[0].lower()
    breaker: dict[str, Any] = {  # every remote tier's circuit-breaker settings
        "failure_threshold": remote.failure_threshold,
        "retry_backoff_s": remote.retry_backoff_s,
        "retry_backoff_max_s": remote.retry_backoff_max_s,
    }
    if scheme.partition("+")[0] in ("redis", "rediss", "valkey", "valkeys", "unix"):
        from kvtier.tiers.redis import RedisTier

        return RedisTier(
            remote.url,
            key_prefix=remote.key_prefix,
            serde_name=remote.serde,
            timeout_s=remote.timeout_s,
            ttl_s=remote.ttl_s,
            max_value_bytes=remote.max_value_bytes,
            username=remote.username,
            password=remote.password,
            **breaker,
        )
    if scheme == "kvtier":
        from kvtier.tiers.remote import RemoteTier

        return RemoteTier(
            remote.url,
            timeout_s=remote.timeout_s,
            token_file=token_file,
            **breaker,
        )
    if scheme == "s3":
        from kvtier.tiers.s3 import S3Tier

        return S3Tier(
            remote.url,
            key_prefix=remote.key_prefix,
            serde_name=remote.serde,
            endpoint_url=remote.endpoint_url,
            region=remote.region,
            timeout_s=remote.timeout_s,
            part_bytes=remote.max_value_bytes,
            max_workers=remote.max_workers,
            **breaker,
        )
    if scheme == "mooncake":
        from kvtier.tiers.mooncake import MooncakeTier

        return MooncakeTier(
            remote.url,
            key_prefix=remote.key_prefix,
            serde_name=remote.serde,
            timeout_s=remote.timeout_s,
            max_workers=remote.max_workers,
            **breaker,
        )
    raise TierError(f"remote.url scheme {scheme!r} has no tier in this build")
