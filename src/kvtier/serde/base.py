"""The chunk format: a fixed 128-byte header followed by the (possibly compressed) payload.

Layout (little-endian)::

    off  size  field
      0     4  magic b"KVTC"
      4     2  format version (1)
      6     2  header size (128)
      8     1  codec id (serde.codec: 0 raw, 1 zstd, 2 lz4, ...)
      9     1  dtype id (_DTYPES)
     10     1  ndim (<= 6)
     11     1  fingerprint length (<= 16)
     12     1  key length (<= 32; 0 = no key recorded)
     13     3  zero
     16     4  num_tokens
     20    24  shape, 6 x u32 (unused dims 0)
     44     4  zero
     48     8  raw payload bytes (the tensor's bytes, before the codec)
     56     8  stored payload bytes (after the codec; what follows the header)
     64     8  xxh3-64 of the stored payload
     72    16  fingerprint, zero padded
     88    32  key, zero padded
    120     8  xxh3-64 of bytes 0..120 (the header checks itself)

Why xxh3-64 and not crc32c: it is already a dependency (``xxhash``), runs at several GB/s on
one core in Python (``zlib.crc32`` measured ~1.7 GB/s here, crc32c needs another native
package), so verifying a 32 MiB chunk costs a few ms and never caps disk/network throughput;
64 bits make an undetected random corruption vanishingly unlikely. It is not a MAC: the threat
is bit rot, torn writes and truncation, not an adversary (the key + fingerprint guard against
mis-filed values).

Why the header has its own checksum: a flipped bit in shape/dtype/fingerprint would otherwise
decode "successfully" into a wrong tensor. The payload checksum is over the *stored* bytes, so
corrupt data is rejected before a decompressor ever sees it.

Invariant: ``decode`` either returns exactly what ``encode`` was given or raises
``CorruptChunkError`` (a ``ValueError``); tiers turn that into a miss and a logged warning.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvtier.chunk import Chunk
from kvtier.errors import KVTierError
from kvtier.serde.codec import Buffer, CodecError, codec_by_id, get_codec

MAGIC = b"KVTC"
FORMAT_VERSION = 1
HEADER_BYTES = 128
MAX_NDIM = 6
MAX_FINGERPRINT_BYTES = 16
MAX_KEY_BYTES = 32

_HEAD = struct.Struct("<4sHHBBBBB3xI6I4xQQQ16s32s")
_SUM = struct.Struct("<Q")
assert _HEAD.size + _SUM.size == HEADER_BYTES

# ids are part of the format: append, never renumber
_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.float64,
    5: torch.float8_e4m3fn,
    6: torch.float8_e5m2,
    7: torch.int8,
    8: torch.uint8,
    9: torch.int16,
    10: torch.int32,
    11: torch.int64,
}
_DTYPE_IDS = {dt: i for i, dt in _DTYPES.items()}


def payload_checksum(data: Buffer) -> int:
    """xxh3-64 of ``data``. Through the hasher object, whose update releases the GIL (the one-shot
    ``xxh3_64_intdigest`` holds it), so reads, writes and hashing on other threads overlap."""
    return xxhash.xxh3_64(data).intdigest()


new_hasher = xxhash.xxh3_64
"""A streaming hasher: ``h = new_hasher(); h.update(piece)...; h.intdigest()`` equals
``payload_checksum`` of the concatenated pieces."""

_hash = payload_checksum


class SerdeError(KVTierError, ValueError):
    """A chunk cannot be encoded (unsupported dtype, too many dims, fingerprint too long)."""


class CorruptChunkError(KVTierError, ValueError):
    """Stored bytes are not a valid chunk: bad magic/version, checksum mismatch, truncation,
    unknown codec/dtype, or a key other than the one expected."""


@dataclass(frozen=True)
class ChunkHeader:
    """The decoded header; ``pack()`` gives back the exact 128 bytes."""

    codec_id: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_tokens: int
    raw_nbytes: int
    payload_nbytes: int
    payload_checksum: int
    fingerprint: bytes
    key: bytes = b""

    @property
    def total_nbytes(self) -> int:
        """Header + stored payload: the size of the encoded blob / file."""
        return HEADER_BYTES + self.payload_nbytes

    def pack(self) -> bytes:
        shape = list(self.shape) + [0] * (MAX_NDIM - len(self.shape))
        head = _HEAD.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_BYTES,
            self.codec_id,
            _DTYPE_IDS[self.dtype],
            len(self.shape),
            len(self.fingerprint),
            len(self.key),
            self.num_tokens,
            *shape,
            self.raw_nbytes,
            self.payload_nbytes,
            self.payload_checksum,
            self.fingerprint,
            self.key,
        )
        return head + _SUM.pack(_hash(head))

    @classmethod
    def unpack(cls, buf: Buffer) -> ChunkHeader:
        """Parse and verify the first ``HEADER_BYTES`` of ``buf``; ``CorruptChunkError`` if bad."""
        mv = memoryview(buf)
        if len(mv) < HEADER_BYTES:
            raise CorruptChunkError(f"truncated header: {len(mv)} of {HEADER_BYTES} bytes")
        head = mv[: _HEAD.size]
        if bytes(head[:4]) != MAGIC:
            raise CorruptChunkError(f"bad magic {bytes(head[:4])!r} (expected {MAGIC!r})")
        (want,) = _SUM.unpack_from(mv, _HEAD.size)
        if _hash(head) != want:
            raise CorruptChunkError("header checksum mismatch")
        f = _HEAD.unpack(head)
        _, version, hsize, codec_id, dtype_id, ndim, fp_len, key_len, num_tokens = f[:9]
        shape6, (raw_n, pay_n, pay_sum, fp, key) = f[9:15], f[15:]
        if version != FORMAT_VERSION or hsize != HEADER_BYTES:
            raise CorruptChunkError(f"unsupported format version {version} / header size {hsize}")
        if dtype_id not in _DTYPES:
            raise CorruptChunkError(f"unknown dtype id {dtype_id}")
        if ndim > MAX_NDIM or fp_len > MAX_FINGERPRINT_BYTES or key_len > MAX_KEY_BYTES:
            raise CorruptChunkError("header field out of range (ndim/fingerprint/key length)")
        dtype = _DTYPES[dtype_id]
        shape = tuple(shape6[:ndim])
        if _numel(shape) * _itemsize(dtype) != raw_n:
            raise CorruptChunkError(f"shape {shape} x {dtype} does not match raw size {raw_n}")
        return cls(
            codec_id,
            dtype,
            shape,
            num_tokens,
            raw_n,
            pay_n,
            pay_sum,
            bytes(fp[:fp_len]),
            bytes(key[:key_len]),
        )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (any dtype, bfloat16 included).

    bfloat16 has no numpy dtype, so the tensor is reinterpreted as uint8 first.
    """
    if t.device.type != "cpu" or not t.is_contiguous():
        raise SerdeError(
            f"need a contiguous CPU tensor, got device={t.device} contiguous={t.is_contiguous()}"
        )
    flat = t.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]


def _host_contiguous(kv: torch.Tensor) -> torch.Tensor:
    kv = kv.detach()
    if kv.device.type != "cpu":
        kv = kv.cpu()
    return kv.contiguous()


def encode_parts(chunk: Chunk, codec: str = "raw", key: bytes = b"") -> tuple[bytes, Buffer]:
    """``(header, payload)`` for ``chunk``: write them back to back (``os.writev``) to store it.

    For the raw codec the payload is a view of the chunk's own memory when it is already a
    contiguous CPU tensor (no copy): keep ``chunk`` unchanged until the payload is written.
    """
    c = get_codec(codec)
    raw = raw_payload(chunk, key)
    payload = c.compress(raw, chunk.kv.element_size()) if c.uses_itemsize else c.compress(raw)  # type: ignore[call-arg]
    return make_header(chunk, key, c.id, len(raw), len(payload), _hash(payload)), payload


def raw_payload(chunk: Chunk, key: bytes = b"") -> memoryview:
    """The chunk's KV bytes (a host view, copied only if the tensor is on a GPU or strided),
    after checking the chunk fits the format; ``SerdeError`` otherwise."""
    kv = chunk.kv
    if kv.dtype not in _DTYPE_IDS:
        raise SerdeError(f"dtype {kv.dtype} has no chunk format id")
    if kv.dim() > MAX_NDIM:
        raise SerdeError(f"at most {MAX_NDIM} dims are supported, got shape {tuple(kv.shape)}")
    if len(chunk.fingerprint) > MAX_FINGERPRINT_BYTES:
        raise SerdeError(f"fingerprint longer than {MAX_FINGERPRINT_BYTES} bytes")
    if len(key) > MAX_KEY_BYTES:
        raise SerdeError(f"key longer than {MAX_KEY_BYTES} bytes")
    if not 0 <= chunk.num_tokens < 1 << 32:
        raise SerdeError(f"num_tokens out of range: {chunk.num_tokens}")
    return tensor_bytes(_host_contiguous(kv))


def make_header(
    chunk: Chunk, key: bytes, codec_id: int, raw_nbytes: int, payload_nbytes: int, checksum: int
) -> bytes:
    """The packed header of ``chunk`` whose stored payload has this size and checksum (for a
    writer that hashes while it writes; ``encode_parts`` does both at once)."""
    kv = chunk.kv
    return ChunkHeader(
        codec_id,
        kv.dtype,
        tuple(int(d) for d in kv.shape),
        chunk.num_tokens,
        raw_nbytes,
        payload_nbytes,
        checksum,
        bytes(chunk.fingerprint),
        bytes(key),
    ).pack()


def encode(chunk: Chunk, codec: str = "raw", key: bytes = b"") -> bytes:
    """One contiguous blob (header + payload), e.g. a Redis value or an S3 object."""
    header, payload = encode_parts(chunk, codec, key)
    return header + bytes(payload)


def verify_payload(header: ChunkHeader, payload: Buffer, checksum: int | None = None) -> None:
    """``CorruptChunkError`` unless ``payload`` has the header's length and checksum.

    ``checksum``: the payload's xxh3 if the caller already computed it (hashing while reading).
    """
    if len(payload) != header.payload_nbytes:
        raise CorruptChunkError(f"payload is {len(payload)} bytes, header says {header.payload_nbytes}")
    if (_hash(payload) if checksum is None else checksum) != header.payload_checksum:
        raise CorruptChunkError("payload checksum mismatch")


def empty_for(header: ChunkHeader) -> torch.Tensor:
    """A fresh CPU tensor of the header's shape and dtype (a destination for ``decode_payload``)."""
    return torch.empty(header.shape, dtype=header.dtype)


def decode_payload(
    header: ChunkHeader, payload: Buffer, out: torch.Tensor | None = None, *, checksum: int | None = None
) -> torch.Tensor:
    """Verify ``payload`` and turn it into a tensor, written into ``out`` when given.

    ``out`` (e.g. a CPU-pool object) must be a contiguous CPU tensor of the header's shape and
    dtype; if ``payload`` already *is* ``out``'s memory (a raw read straight into it), only the
    checksum is computed.
    """
    verify_payload(header, payload, checksum)
    codec = codec_by_id(header.codec_id)
    if codec is None:
        raise CorruptChunkError(f"unknown codec id {header.codec_id}")
    try:
        raw = codec.decompress(payload, header.raw_nbytes)
    except (ValueError, CodecError) as e:
        raise CorruptChunkError(f"codec {codec.name} could not decode the payload: {e}") from e
    if len(raw) != header.raw_nbytes:
        raise CorruptChunkError(f"decoded {len(raw)} bytes, header says {header.raw_nbytes}")
    if out is None:
        out = empty_for(header)
    elif tuple(out.shape) != header.shape or out.dtype != header.dtype:
        raise SerdeError(f"out is {tuple(out.shape)} {out.dtype}, chunk is {header.shape} {header.dtype}")
    dst = tensor_bytes(out)
    if not _same_memory(dst, raw):
        dst[:] = raw
    return out


def decode(data: Buffer, *, expect_key: bytes | None = None, out: torch.Tensor | None = None) -> Chunk:
    """The chunk in ``data`` (exactly one encoded blob); ``CorruptChunkError`` on any problem.

    With ``expect_key`` the key recorded in the header must match (a value stored under the
    wrong key is corrupt, not a hit). With ``out`` the KV is written there (no allocation).
    """
    mv = memoryview(data).cast("B")
    header = ChunkHeader.unpack(mv)
    check_key(header, expect_key)
    if len(mv) != header.total_nbytes:
        raise CorruptChunkError(f"blob is {len(mv)} bytes, header says {header.total_nbytes}")
    kv = decode_payload(header, mv[HEADER_BYTES:], out)
    return Chunk(kv, header.fingerprint, header.num_tokens)


def check_key(header: ChunkHeader, expect_key: bytes | None) -> None:
    if expect_key is not None and header.key != expect_key:
        raise CorruptChunkError(f"chunk was stored under key {header.key.hex()}, not {expect_key.hex()}")


def _same_memory(a: Buffer, b: Buffer) -> bool:
    if len(a) != len(b) or not len(a):
        return False
    addr = np.frombuffer(a, np.uint8).__array_interface__["data"][0]
    return bool(addr == np.frombuffer(b, np.uint8).__array_interface__["data"][0])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
