"""Tier factories for the conformance suite: every tier registers one here.

A factory takes a byte capacity and pytest's ``tmp_path`` and returns a fresh tier; a factory
for a tier whose server is not available calls ``pytest.skip``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.remote.factories import REMOTE_TIER_FACTORIES
from tests.server.daemons import DAEMON_TIER_FACTORIES

from kvtier.tiers.base import Tier
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.disk import DiskTier

TierFactory = Callable[[int, Path], Tier]


def _cpu(capacity: int, tmp_path: Path) -> Tier:
    return CPUTier(capacity, policy="lru")


def _disk(capacity: int, tmp_path: Path) -> Tier:
    # the disk tier counts allocated blocks: a 1 KiB test chunk takes a 4 KiB block, and folders
    # take a block each (root, tmp, a fan-out folder); so the suite's chunk counts fit as elsewhere
    block = os.statvfs(tmp_path).f_frsize
    path = tmp_path / f"disk-{len(list(tmp_path.glob('disk-*')))}"
    return DiskTier(path, capacity * block // 1024 + 3 * block, policy="lru")


TIER_FACTORIES: dict[str, TierFactory] = {"cpu": _cpu, "disk": _disk}

TIER_FACTORIES.update(REMOTE_TIER_FACTORIES)  # redis, s3: shared session servers (tests/remote/servers.py)
TIER_FACTORIES.update(DAEMON_TIER_FACTORIES)  # kvtier server: session daemons (tests/server/daemons.py)


@pytest.fixture(params=sorted(TIER_FACTORIES))
def make_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[int], Tier]]:
    made: list[Tier] = []

    def factory(capacity: int = 1 << 20) -> Tier:
        t = TIER_FACTORIES[request.param](capacity, tmp_path)
        made.append(t)
        return t

    yield factory
    for t in made:
        t.close()
