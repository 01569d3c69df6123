"""zstd and lz4 codecs: registered by name and id, lossless on every dtype, corrupt => error."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tests.remote import servers

from kvtier import serde
from kvtier.chunk import Chunk
from kvtier.tiers.redis import RedisTier


@pytest.mark.parametrize("name", ["zstd", "lz4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(name: str, dtype: torch.dtype) -> None:
    codec = serde.get_codec(name)
    assert serde.codec_by_id(codec.id) is codec
    kv = torch.randn(2, 2, 64, 2, 16).to(dtype)
    kv[0] = 0  # a compressible half
    blob = serde.encode(Chunk(kv, b"fp", 64), name)
    assert len(blob) < serde.HEADER_BYTES + kv.numel() * kv.element_size()
    got = serde.decode(blob)
    assert got.kv.dtype == dtype and torch.equal(got.kv, kv)
    empty = serde.decode(serde.encode(Chunk(torch.empty(1, 2, 0, 2, 4, dtype=dtype), b"", 0), name))
    assert empty.kv.shape == (1, 2, 0, 2, 4)


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_garbage_payload_is_corrupt(name: str) -> None:
    codec = serde.get_codec(name)
    with pytest.raises(ValueError, match=name):
        codec.decompress(b"\x00" * 64, 1000)
    good = codec.compress(b"abc" * 100)
    with pytest.raises(ValueError, match="expected"):
        codec.decompress(good, 299)  # a size that is not what the header promised


def test_threads_share_one_codec() -> None:
    codec = serde.get_codec("zstd")
    datas = [bytes([i]) * 100_000 + torch.randn(1000).numpy().tobytes() for i in range(32)]
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda d: bytes(codec.decompress(codec.compress(d), len(d))), datas))
    assert outs == datas


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_redis_tier_with_codec(name: str) -> None:
    if servers.REDIS_SERVER is None:
        pytest.skip(servers.NO_REDIS_REASON)
    t = RedisTier(servers.shared_redis().url, key_prefix=f"c{uuid.uuid4().hex[:8]}", serde_name=name)
    kv = torch.zeros(2, 2, 256, 2, 16, dtype=torch.bfloat16)
    assert t.put(b"z" * 16, Chunk(kv, b"fp", 256))
    assert t.stats().bytes_used < kv.numel() * 2 // 10  # zeros compress
    got = t.get(b"z" * 16)
    assert got is not None and torch.equal(got.kv, kv)
    t.close()
