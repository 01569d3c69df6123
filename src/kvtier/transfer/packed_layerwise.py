"""A layer-wise KV source over *packed* (lossy ``kv_codec``) chunk views, decoded on the GPU.

``ChunkedLayerwiseKV`` copies raw chunk layers from the pinned pool to the GPU in layer groups
while the forward computes. Under a lossy codec the pool holds each chunk's packed bytes
(``serde.kvcodec``: every part - codes, then each scale array - layer-major), so a group of
layers ``[l0, l1)`` of one chunk is one contiguous byte range per part. This source copies just
those ranges (int8: 0.52x the raw bytes, int4: 0.3x) and decodes the whole group on the side
stream, behind the copies, into the raw source's group layout ``[chunks, layers, P, ct, H, D]``;
``take`` is the raw source's. Why: the host-decoding path (``CacheEngine.retrieve(device=)``
chunk by chunk, then the forward) made an int8 32k hit slower than a raw one on an H200
(106.6 vs 91.5 ms) although half the bytes cross.

Why one decode per group, not per chunk: the parts are layer-major, so ``C`` chunks of ``G``
layers each, laid part by part chunk after chunk, are exactly the packed form of ``C * G``
"layers" of one chunk's shape. One ``decode`` call (a handful of kernels) covers the group; per
chunk it would be ~1,000 calls for a 32k hit, each a few launches on the thread driving the
forward. A shorter tail chunk is decoded on its own (its parts have other sizes).

Invariant: the bits handed out are ``codec.decode`` of the stored bytes, as the host path gives
(the codecs compute device-independent bits; ``tests/gpu/test_codec_cuda.py``).
"""

from __future__ import annotations

import torch

from kvtier.engine import ChunkViews
from kvtier.serde.kvcodec import KVCodec
from kvtier.transfer.layerwise import ChunkedLayerwiseKV
from kvtier.transfer.layout import LayoutError

__all__ = ["PackedChunkedLayerwiseKV", "decode_layers"]

Shape = tuple[int, int, int, int, int]


class PackedChunkedLayerwiseKV(ChunkedLayerwiseKV):
    """``ChunkedLayerwiseKV`` for packed chunks: ``views`` from ``retrieve_chunks(decode=False)``,
    ``chunk_shape`` = ``(layers, planes, chunk_tokens, heads, head_dim)`` of a full chunk, ``dtype``
    the KV dtype to decode to."""

    def __init__(
        self,
        views: list[ChunkViews],
        num_tokens: int,
        device: torch.device,
        codec: KVCodec,
        chunk_shape: Shape,
        dtype: torch.dtype,
        group_layers: int = 0,
        latent_split: int | None = None,
    ) -> None:
        self.codec = codec
        self.chunk_shape = chunk_shape
        self.kv_dtype = dtype
        for v in views:
            for k, chunk in v.chunks:
                want = codec.packed_nbytes(_with(chunk_shape, tokens=k.num_tokens))
                if chunk.kv.dtype != torch.uint8 or chunk.kv.dim() != 1 or chunk.kv.numel() != want:
                    raise LayoutError(
                        f"chunk at {k.start}: {tuple(chunk.kv.shape)} {chunk.kv.dtype} is not a packed "
                        f"{codec.name} chunk of {k.num_tokens} tokens ({want} bytes)"
                    )
        super().__init__(views, num_tokens, device, group_layers, latent_split, num_layers=chunk_shape[0])

    def _dims(self, first: torch.Tensor) -> tuple[int, int, int, torch.dtype]:
        _, planes, _, heads, width = self.chunk_shape
        return planes, heads, width, self.kv_dtype

    def _stage(self, l0: int, l1: int) -> list[torch.Tensor]:
        return [
            decode_layers(
                self.codec,
                self.chunk_shape,
                [(k.num_tokens, c.kv) for k, c in v.chunks],
                l0,
                l1,
                self.device,
                self.kv_dtype,
            )
            for v in self.views
        ]


def _with(shape: Shape, *, tokens: int, layers: int | None = None) -> Shape:
    """``shape`` (layers, planes, tokens, heads, dim) with another token (and layer) count."""
    return (shape[0] if layers is None else layers, shape[1], tokens, shape[3], shape[4])


def _copy_parts(
    codec: KVCodec,
    chunk_shape: Shape,
    chunks: list[torch.Tensor],
    tokens: int,
    l0: int,
    l1: int,
    device: torch.device,
) -> torch.Tensor:
    """Layers ``[l0, l1)`` of packed ``chunks`` (``tokens`` each) on ``device``, laid out as the
    packed form of ``len(chunks) * (l1 - l0)`` layers: part by part, chunk after chunk."""
    sizes = codec.segments(_with(chunk_shape, tokens=tokens))
    n_layers, g, c = chunk_shape[0], l1 - l0, len(chunks)
    dst = torch.empty(c * g * sum(s // n_layers for s in sizes), dtype=torch.uint8, device=device)
    at_src = at_dst = 0
    for size in sizes:
        per = size // n_layers
        for i, chunk in enumerate(chunks):
            piece = dst[at_dst + i * g * per : at_dst + (i + 1) * g * per]
            piece.copy_(chunk[at_src + l0 * per : at_src + l1 * per], non_blocking=True)
        at_src += size
        at_dst += c * g * per
    return dst


def decode_layers(
    codec: KVCodec,
    chunk_shape: Shape,
    chunks: list[tuple[int, torch.Tensor]],
    l0: int,
    l1: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Layers ``[l0, l1)`` of a prefix's packed chunks (``(tokens, packed)`` in order; only the
    last may be short) decoded on ``device`` as ``[chunks, l1 - l0, P, ct, H, D]`` (a short tail
    zero-padded): one decode for the full chunks, one for the tail. On CUDA call it inside the
    stream the copies should run on; the result is ``codec.decode`` of each chunk, layers sliced."""
    ct = chunk_shape[2]
    full = [kv for n, kv in chunks if n == ct]
    tails = [(n, kv) for n, kv in chunks if n != ct]
    if len(tails) > 1 or (tails and chunks[-1][0] == ct) or any(n > ct or n <= 0 for n, _ in tails):
        raise LayoutError("only the last chunk of a prefix may be shorter than chunk_tokens")
    layers = l1 - l0
    parts = []
    if full:
        packed = _copy_parts(codec, chunk_shape, full, ct, l0, l1, device)
        dec = codec.decode(packed, _with(chunk_shape, tokens=ct, layers=len(full) * layers), dtype)
        parts.append(dec.view(len(full), layers, *dec.shape[1:]))
    if tails:
        n, kv = tails[0]
        packed = _copy_parts(codec, chunk_shape, [kv], n, l0, l1, device)
        dec = codec.decode(packed, _with(chunk_shape, tokens=n, layers=layers), dtype)
        tail = torch.zeros((1, layers, *chunk_shape[1:]), dtype=dtype, device=device)
        tail[0, :, :, :n] = dec
        parts.append(tail)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
