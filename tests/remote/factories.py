"""Conformance-suite factories for the remote tiers (registered in tests/tiers/conftest.py).

Each call gets a fresh key prefix on the session's shared server, so tests never see each
other's chunks; a missing ``redis-server`` skips with the reason.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from tests.remote import servers

from kvtier.tiers.base import Tier


def redis_tier(capacity: int, tmp_path: Path) -> Tier:
    if servers.REDIS_SERVER is None:
        pytest.skip(servers.NO_REDIS_REASON)
    from kvtier.tiers.redis import RedisTier

    # a small max_value_bytes so the suite also exercises split values (parts + manifest)
    return RedisTier(servers.shared_redis().url, key_prefix=f"t{uuid.uuid4().hex[:12]}", max_value_bytes=4096)


def s3_tier(capacity: int, tmp_path: Path) -> Tier:
    from kvtier.tiers.s3 import S3Tier

    s3 = servers.shared_s3()
    return S3Tier(
        "s3://kvtier-test",
        key_prefix=f"t{uuid.uuid4().hex[:12]}",
        endpoint_url=s3.endpoint_url,
        create_bucket=True,
    )


def mooncake_tier(capacity: int, tmp_path: Path) -> Tier:
    if servers.MOONCAKE_MASTER is None:
        pytest.skip(servers.NO_MOONCAKE_REASON)
    from kvtier.tiers.mooncake import MooncakeTier

    return MooncakeTier(servers.shared_mooncake().url, key_prefix=f"t{uuid.uuid4().hex[:12]}", timeout_s=10.0)


REMOTE_TIER_FACTORIES = {"redis": redis_tier, "s3": s3_tier, "mooncake": mooncake_tier}
