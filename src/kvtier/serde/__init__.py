"""Bytes on disk and on the wire: one chunk format (``base``) and pluggable codecs (``codec``).

``encode``/``decode`` turn a ``tiers.base.Chunk`` into a self-checking blob and back; any
mismatch raises ``CorruptChunkError``. Codecs register themselves by name and id; the zstd/lz4
codecs live in ``serde/compress.py`` and are registered by importing it here when present.
"""

from __future__ import annotations

import importlib

from kvtier.serde.base import (
    FORMAT_VERSION,
    HEADER_BYTES,
    ChunkHeader,
    CorruptChunkError,
    SerdeError,
    decode,
    decode_payload,
    encode,
    encode_parts,
    tensor_bytes,
)
from kvtier.serde.codec import CODECS, Codec, CodecError, codec_by_id, get_codec, register_codec

for _mod in ("kvtier.serde.compress", "kvtier.serde.shuffle"):
    try:  # optional codecs (zstd, lz4, shuffle-zstd); their modules register them on import
        importlib.import_module(_mod)
    except ModuleNotFoundError as e:
        # tolerated: a compression library of the optional ``compress`` extra is not installed
        # (raw still works; asking for zstd/lz4 then names the extra). A missing kvtier module
        # is a bug and is raised.
        if (e.name or "").startswith("kvtier."):
            raise

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "ChunkHeader",
    "Codec",
    "CodecError",
    "CorruptChunkError",
    "SerdeError",
    "codec_by_id",
    "decode",
    "decode_payload",
    "encode",
    "encode_parts",
    "get_codec",
    "register_codec",
    "tensor_bytes",
]
