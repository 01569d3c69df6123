"""Fixtures with real stores: a session redis-server, a 3-node cluster, moto S3, and a private
redis-server per test for the fault tests (which kill it). No redis-server => skip, saying why."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.remote import servers


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_servers() -> Iterator[None]:
    yield
    servers.stop_shared()


def _need_redis() -> None:
    if servers.REDIS_SERVER is None or servers.REDIS_CLI is None:
        pytest.skip(servers.NO_REDIS_REASON)


@pytest.fixture(scope="session")
def redis_server() -> servers.RedisServer:
    _need_redis()
    return servers.shared_redis()


@pytest.fixture(scope="session")
def redis_cluster() -> servers.RedisCluster:
    _need_redis()
    return servers.shared_cluster()


@pytest.fixture(scope="session")
def s3_server() -> servers.S3Server:
    return servers.shared_s3()


@pytest.fixture
def own_redis() -> Iterator[servers.RedisServer]:
    """A private server this test may kill and restart (same port)."""
    _need_redis()
    s = servers.RedisServer().start()
    yield s
    s.cleanup()
