"""The S3 tier against moto's real S3 protocol server: multipart, corruption, a dead endpoint."""

from __future__ import annotations

import time
import uuid

import boto3
import pytest
import torch
from tests.remote import servers

from kvtier import Config
from kvtier.chunk import Chunk
from kvtier.tiers.base import TierError
from kvtier.tiers.factory import build_tiers
from kvtier.tiers.s3 import S3Tier, parse_s3_url


def test_parse_url() -> None:
    assert parse_s3_url("s3://b/some/prefix/") == ("b", "some/prefix")
    assert parse_s3_url("s3://b") == ("b", "")
    with pytest.raises(TierError):
        parse_s3_url("s3:///nobucket")


def test_big_chunk_multipart_and_ranged_reads(s3_server: servers.S3Server) -> None:
    p = f"mp{uuid.uuid4().hex[:8]}"
    cfg = Config.load(
        env={},
        cpu__enabled=False,
        remote__url=f"s3://kvtier-test/{p}",
        remote__endpoint_url=s3_server.endpoint_url,
        remote__max_value_bytes="5MiB",
    )
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket="kvtier-test")
    (tier,) = build_tiers(cfg)
    assert isinstance(tier, S3Tier) and tier.prefix == p
    kv = torch.randn(4, 2, 1536, 2, 128)  # 12 MiB: 3 parts up, 3 ranges down
    assert tier.put(b"b" * 16, Chunk(kv, b"fp", 1536))
    head = boto3.client("s3", endpoint_url=s3_server.endpoint_url).head_object(
        Bucket="kvtier-test", Key=f"{p}/{(b'b' * 16).hex()}"
    )
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload
    got = tier.get(b"b" * 16)
    assert got is not None and torch.equal(got.kv, kv)
    tier.close()


def test_corrupt_object_is_a_miss_and_deleted(s3_server: servers.S3Server) -> None:
    p = f"c{uuid.uuid4().hex[:8]}"
    tier = S3Tier(f"s3://kvtier-test/{p}", endpoint_url=s3_server.endpoint_url, create_bucket=True)
    kv = torch.randn(2, 2, 8, 2, 4)
    tier.put(b"c" * 16, Chunk(kv, b"fp", 8))
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    name = f"{p}/{(b'c' * 16).hex()}"
    body = bytearray(s3.get_object(Bucket="kvtier-test", Key=name)["Body"].read())
    body[200] ^= 1
    s3.put_object(Bucket="kvtier-test", Key=name, Body=bytes(body))
    assert tier.get(b"c" * 16) is None and not tier.contains(b"c" * 16)
    assert tier.stats().errors == 1
    tier.close()


def test_dead_endpoint_is_misses_within_timeout() -> None:
    port = servers.free_port()  # nothing listens here
    tier = S3Tier(
        "s3://nobucket/x",
        endpoint_url=f"http://127.0.0.1:{port}",
        timeout_s=0.5,
        failure_threshold=2,
        retry_backoff_s=10,
    )
    t0 = time.monotonic()
    for _ in range(10):
        assert tier.get(b"d" * 16) is None
        assert not tier.put(b"d" * 16, Chunk(torch.zeros(1, 2, 1, 1, 1), b"", 1))
        assert tier.prefix_contains([b"d" * 16]) == 0
    assert time.monotonic() - t0 < 3.0
    s = tier.stats()
    assert s.errors == 2 and s.misses == 10 and s.put_failures == 10
    tier.close()
