"""Codecs: how a chunk's payload bytes are transformed for storage (raw, zstd, lz4, ...).

A codec is found by ``name`` (config: ``remote.serde``) when writing and by its one-byte ``id``
(stored in every chunk header) when reading, so a reader never needs to be told how a chunk
was written. Registering a codec is one call: ``register_codec(MyCodec())`` at import time of
the module that defines it (``serde/compress.py`` for zstd/lz4 is imported by
``kvtier.serde`` when it exists).

Ids are part of the on-disk/on-wire format and never reused: 0 raw, 1 zstd, 2 lz4,
16..31 quantized formats, 128..255 free for experiments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvtier.errors import KVTierError

Buffer = bytes | bytearray | memoryview


class CodecError(KVTierError, ValueError):
    """A codec name/id is unknown, or a codec was registered twice under one name/id."""


class Codec(ABC):
    """Compress/decompress a payload. Stateless and thread-safe (tiers call it from workers)."""

    name: str
    id: int

    @abstractmethod
    def compress(self, data: Buffer) -> Buffer:
        """The stored form of ``data`` (may return ``data`` itself, never modifies it)."""

    @abstractmethod
    def decompress(self, data: Buffer, raw_nbytes: int) -> Buffer:
        """The original bytes, exactly ``raw_nbytes`` long.

        Raises ``ValueError`` (or a subclass) if ``data`` cannot be decoded; callers turn that
        into a ``CorruptChunkError``. ``data`` has already passed the payload checksum.
        """


class RawCodec(Codec):
    """Identity: the payload is the tensor's bytes. Zero copies on both sides."""

    name = "raw"
    id = 0

    def compress(self, data: Buffer) -> Buffer:
        return data

    def decompress(self, data: Buffer, raw_nbytes: int) -> Buffer:
        if len(data) != raw_nbytes:
            raise CodecError(f"raw payload is {len(data)} bytes, header says {raw_nbytes}")
        return data


CODECS: dict[str, Codec] = {}
_BY_ID: dict[int, Codec] = {}


def register_codec(codec: Codec, *, replace: bool = False) -> Codec:
    """Make ``codec`` available by name and id; a clash is an error unless ``replace``."""
    if not 0 <= codec.id <= 255:
        raise CodecError(f"codec {codec.name!r}: id must fit in one byte, got {codec.id}")
    if not replace:
        if codec.name in CODECS and CODECS[codec.name] is not codec:
            raise CodecError(f"a codec named {codec.name!r} is already registered")
        if codec.id in _BY_ID and _BY_ID[codec.id] is not codec:
            raise CodecError(f"codec id {codec.id} is already taken by {_BY_ID[codec.id].name!r}")
    CODECS[codec.name] = codec
    _BY_ID[codec.id] = codec
    return codec


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``; ``CodecError`` lists the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        hint = " (install the 'compress' extra: zstandard, lz4)" if name in ("zstd", "lz4") else ""
        raise CodecError(f"unknown codec {name!r}; known: {sorted(CODECS)}{hint}") from None


def codec_by_id(codec_id: int) -> Codec | None:
    """The codec with this header id, or ``None`` (a reader treats that as a corrupt chunk)."""
    return _BY_ID.get(codec_id)


RAW = register_codec(RawCodec())
