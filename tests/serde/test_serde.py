"""The chunk format: exact round trips, and every kind of damage -> CorruptChunkError."""

from __future__ import annotations

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.serde import (
    HEADER_BYTES,
    ChunkHeader,
    Codec,
    CodecError,
    CorruptChunkError,
    SerdeError,
    codec_by_id,
    decode,
    encode,
    encode_parts,
    get_codec,
    register_codec,
)
from kvtier.serde.base import decode_payload, tensor_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int8]
KEY = bytes(range(16))


def _chunk(dtype: torch.dtype = torch.bfloat16, tokens: int = 8, seed: int = 0) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(3, 2, tokens, 2, 4, generator=g) * 10).to(dtype)
    return Chunk(kv, b"fp-" + bytes([seed]), tokens)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN-safe, works for float8)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype(dtype: torch.dtype) -> None:
    c = _chunk(dtype)
    got = decode(encode(c, key=KEY), expect_key=KEY)
    assert _same(got.kv, c.kv)
    assert got.fingerprint == c.fingerprint and got.num_tokens == c.num_tokens


def test_strided_view_and_header_fields() -> None:
    big = torch.randn(3, 2, 32, 2, 4).to(torch.bfloat16)
    view = big[:, :, 8:16]
    assert not view.is_contiguous()
    blob = encode(Chunk(view, b"f", 8), key=KEY)
    h = ChunkHeader.unpack(blob)
    assert h.shape == (3, 2, 8, 2, 4) and h.dtype == torch.bfloat16 and h.key == KEY
    assert h.raw_nbytes == view.numel() * 2 == h.payload_nbytes and len(blob) == HEADER_BYTES + h.raw_nbytes
    assert _same(decode(blob).kv, view.contiguous())


def test_empty_and_special_values() -> None:
    kv = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).view(1, 1, 4, 1, 1)
    assert _same(decode(encode(Chunk(kv, b"", 4))).kv, kv)
    empty = torch.empty(2, 2, 0, 2, 4, dtype=torch.float16)
    got = decode(encode(Chunk(empty, b"", 0)))
    assert got.kv.shape == empty.shape and got.num_tokens == 0


def test_decode_into_preallocated_tensor() -> None:
    c = _chunk(torch.float16)
    out = torch.zeros_like(c.kv)
    got = decode(encode(c), out=out)
    assert got.kv is out and _same(out, c.kv)
    with pytest.raises(SerdeError):
        decode(encode(c), out=torch.zeros(3, dtype=torch.float16))


def test_payload_read_straight_into_destination() -> None:
    """The disk tier's path: payload bytes land in ``out``'s memory, decode only verifies."""
    c = _chunk(torch.bfloat16)
    header, payload = encode_parts(c)
    h = ChunkHeader.unpack(header)
    out = torch.empty(h.shape, dtype=h.dtype)
    dst = tensor_bytes(out)
    dst[:] = payload
    assert decode_payload(h, dst, out) is out and _same(out, c.kv)


def _corruptions(blob: bytes) -> dict[str, bytes]:
    def flip(i: int) -> bytes:
        b = bytearray(blob)
        b[i] ^= 0x01
        return bytes(b)

    cases = {f"flip@{i}": flip(i) for i in (0, 4, 9, 12, 16, 24, 50, 66, 80, 100, 125)}
    cases |= {"flip-payload-first": flip(HEADER_BYTES), "flip-payload-last": flip(len(blob) - 1)}
    cases |= {
        "truncated-payload": blob[:-1],
        "truncated-header": blob[: HEADER_BYTES - 1],
        "header-only": blob[:HEADER_BYTES],
        "empty": b"",
        "trailing-garbage": blob + b"\0",
        "wrong-magic": b"XXXX" + blob[4:],
    }
    # a well-formed header with a wrong version / unknown codec (checksum recomputed)
    for name, off, val in (("wrong-version", 4, 2), ("unknown-codec", 8, 200), ("unknown-dtype", 9, 99)):
        import struct

        import xxhash

        b = bytearray(blob)
        if off == 4:
            struct.pack_into("<H", b, off, val)
        else:
            b[off] = val
        struct.pack_into("<Q", b, 120, xxhash.xxh3_64_intdigest(bytes(b[:120])))
        cases[name] = bytes(b)
    return cases


@pytest.mark.parametrize("case", list(_corruptions(encode(_chunk(), key=KEY))))
def test_every_corruption_is_detected(case: str) -> None:
    bad = _corruptions(encode(_chunk(), key=KEY))[case]
    with pytest.raises(CorruptChunkError):
        decode(bad, expect_key=KEY)


def test_wrong_key_is_corrupt() -> None:
    blob = encode(_chunk(), key=KEY)
    with pytest.raises(CorruptChunkError, match="stored under key"):
        decode(blob, expect_key=b"\xff" * 16)
    assert decode(blob).num_tokens == 8  # no expectation: fine


def test_corrupt_is_a_value_error() -> None:
    assert issubclass(CorruptChunkError, ValueError)


def test_encode_rejects_what_the_format_cannot_hold() -> None:
    with pytest.raises(SerdeError):
        encode(Chunk(torch.zeros(1, dtype=torch.complex64), b"", 1))
    with pytest.raises(SerdeError):
        encode(Chunk(torch.zeros(1, 1, 1, 1, 1, 1, 1), b"", 1))
    with pytest.raises(SerdeError):
        encode(Chunk(torch.zeros(1), b"x" * 17, 1))
    with pytest.raises(CodecError):
        encode(_chunk(), codec="nope")


class _XorCodec(Codec):
    """A toy codec that changes the bytes, to prove codecs are wired through both ways."""

    name = "test-xor"
    id = 250

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(b ^ 0x5A for b in bytes(data)) + b"!"

    def decompress(self, data: bytes | bytearray | memoryview, raw_nbytes: int) -> bytes:
        d = bytes(data)
        if not d.endswith(b"!"):
            raise ValueError("missing trailer")
        return bytes(b ^ 0x5A for b in d[:-1])


def test_codec_registry_and_custom_codec() -> None:
    xor = register_codec(_XorCodec())
    assert get_codec("test-xor") is xor and codec_by_id(250) is xor and get_codec("raw").id == 0
    with pytest.raises(CodecError):
        register_codec(_XorCodec())  # a second instance under a taken name
    c = _chunk(torch.float32)
    blob = encode(c, codec="test-xor")
    assert ChunkHeader.unpack(blob).payload_nbytes == c.nbytes + 1
    assert _same(decode(blob).kv, c.kv)


def test_encode_of_a_cuda_tensor_goes_through_host() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    c = _chunk(torch.bfloat16)
    got = decode(encode(Chunk(c.kv.cuda(), c.fingerprint, c.num_tokens)))
    assert got.kv.device.type == "cpu" and _same(got.kv, c.kv)
