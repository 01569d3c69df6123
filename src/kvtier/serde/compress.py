"""zstd and lz4 codecs (ids 1 and 2), registered in the serde codec registry on import.

Lossless general-purpose compressors over the tensor's bytes. On fp16/bf16 KV they save little
(the mantissa bytes are noise; see benchmarks/RESULTS.md for the measured ratios on SmolLM2 KV),
so they pay off only where the link is much slower than the compressor: a WAN-distance S3
bucket, a saturated shared Redis. ``raw`` stays the default.

Thread safety: zstandard's (de)compressor objects must not be shared between threads, so each
thread keeps its own (``threading.local``); lz4.frame's functions are stateless.

Why level 1 for zstd (and lz4's default fast mode): a remote tier stores on the request path,
and a higher level costs several times the CPU for a percent or two on near-random float bytes.
"""

from __future__ import annotations

import threading

import lz4.frame
import zstandard

from kvtier.serde.codec import Buffer, Codec, CodecError, register_codec


class ZstdCodec(Codec):
    name = "zstd"
    id = 1

    def __init__(self, level: int = 1) -> None:
        self.level = level
        self._local = threading.local()

    def _ctx(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = (zstandard.ZstdCompressor(level=self.level), zstandard.ZstdDecompressor())
        return ctx

    def compress(self, data: Buffer) -> Buffer:
        return self._ctx()[0].compress(data)

    def decompress(self, data: Buffer, raw_nbytes: int) -> Buffer:
        try:
            out = self._ctx()[1].decompress(data, max_output_size=raw_nbytes)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: {e}") from e
        if len(out) != raw_nbytes:
            raise CodecError(f"zstd: decoded {len(out)} bytes, expected {raw_nbytes}")
        return out


class LZ4Codec(Codec):
    name = "lz4"
    id = 2

    def compress(self, data: Buffer) -> Buffer:
        return lz4.frame.compress(data, store_size=True)

    def decompress(self, data: Buffer, raw_nbytes: int) -> Buffer:
        try:
            out = lz4.frame.decompress(data)
        except RuntimeError as e:  # lz4.frame reports corrupt frames as RuntimeError
            raise CodecError(f"lz4: {e}") from e
        if len(out) != raw_nbytes:
            raise CodecError(f"lz4: decoded {len(out)} bytes, expected {raw_nbytes}")
        return out


ZSTD = register_codec(ZstdCodec())
LZ4 = register_codec(LZ4Codec())
