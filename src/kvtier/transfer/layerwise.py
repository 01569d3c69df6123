"""Layer-wise KV sources for engines that install a cached prefix one layer at a time.

Transformers' attention layers ask for their KV in order during the forward; these sources hand
layer ``i``'s cached prefix out as ``[B, H, n, D]`` keys/values when asked and, on CUDA, start
copying the next layer(s) on a side stream first, so transfer overlaps compute. ``cache_to_kv``
is the opposite direction: a transformers cache's layers to kvtier's ``[L, 2, T, H, D]`` rows.

MLA (``latent_split=r``): transformers caches keys ``[B, 1, T, r]`` and values ``[B, 1, T, rope]``
of different widths; kvtier keeps them as one plane ``[L, 1, T, 1, r + rope]`` (keys first), and
the sources split that row back into the two tensors.

Stream contract: ``take(i)`` makes the *current* stream wait for layer ``i``'s copy only; the
buffers are ``record_stream``-ed on it, so the allocator keeps them until that work is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvtier.devcopy2d import Copy2D, PinnedStorages, Rows, add_row, available, copy_rows
from kvtier.engine import ChunkViews
from kvtier.transfer.kernels.host import side_stream
from kvtier.transfer.layout import LayoutError

__all__ = ["ChunkedLayerwiseKV", "LayerwiseKV", "cache_to_kv", "chunk_runs"]


def chunk_runs(
    kvs: list[torch.Tensor], l0: int, l1: int, dst: torch.Tensor, pinned: Callable[[torch.Tensor], bool]
) -> tuple[list[Rows], list[tuple[int, torch.Tensor]]]:
    """Layers ``[l0, l1)`` of chunks ``kvs`` (``[L, P, n, H, D]`` each) into ``dst[c]``
    (``[chunks, l1 - l0, P, ct, H, D]``, contiguous) as 2D copies: ``(runs, rest)``, where
    consecutive full, contiguous, ``pinned`` chunks lying at a constant pitch share one run
    (``Rows``) and ``rest`` lists ``(index, kv)`` of the others (a partial last chunk, pageable
    memory) for one copy each. Every chunk is in exactly one of the two; rows never overlap."""
    runs: list[Rows] = []
    rest: list[tuple[int, torch.Tensor]] = []
    ct = int(dst.shape[3])
    isz = dst.element_size()
    row_bytes = int(dst.stride(0)) * isz
    for c, kv in enumerate(kvs):
        if int(kv.shape[2]) != ct or not kv.is_contiguous() or kv.dtype != dst.dtype or not pinned(kv):
            rest.append((c, kv))
            continue
        per_layer = int(kv.stride(0)) * isz
        width = per_layer * (l1 - l0)
        if width != row_bytes:
            rest.append((c, kv))
            continue
        src_ptr = kv.data_ptr() + l0 * per_layer
        dst_ptr = dst.data_ptr() + c * row_bytes
        add_row(runs, kv, src_ptr, dst, dst_ptr, width)
    return runs, rest


def cache_to_kv(
    cache: Any, num_tokens: int, *, batch_index: int = 0, latent_split: int | None = None
) -> torch.Tensor:
    """The first ``num_tokens`` positions of ``cache`` as ``[L, 2, T, H, D]`` (a new contiguous
    tensor); with ``latent_split`` (MLA) as ``[L, 1, T, 1, keys + values width]``."""
    layers = cache.layers
    first = layers[0].keys
    n_layers = len(layers)
    _, heads, seq, dim = first.shape
    if seq < num_tokens:
        raise LayoutError(f"the cache holds {seq} positions, fewer than the {num_tokens} to store")
    if latent_split is not None:
        return _latent_rows(layers, num_tokens, batch_index, latent_split)
    out = torch.empty((n_layers, 2, num_tokens, heads, dim), dtype=first.dtype, device=first.device)
    for i, layer in enumerate(layers):
        if layer.keys.shape[-2] < num_tokens:
            raise LayoutError(f"layer {i} holds {layer.keys.shape[-2]} positions, expected >= {num_tokens}")
        if layer.keys.shape != layer.values.shape:
            raise LayoutError(
                f"layer {i}: keys {tuple(layer.keys.shape)} and values {tuple(layer.values.shape)} differ "
                "in shape (an MLA latent cache: pass latent_split)"
            )
        out[i, 0].copy_(layer.keys[batch_index, :, :num_tokens].transpose(0, 1))
        out[i, 1].copy_(layer.values[batch_index, :, :num_tokens].transpose(0, 1))
    return out


def _latent_rows(layers: Any, num_tokens: int, batch_index: int, split: int) -> torch.Tensor:
    """MLA layers' keys ``[B, 1, T, split]`` and values ``[B, 1, T, rest]`` as ``[L, 1, T, 1, split + rest]``."""
    k0, v0 = layers[0].keys, layers[0].values
    width = int(k0.shape[-1]) + int(v0.shape[-1])
    out = torch.empty((len(layers), 1, num_tokens, 1, width), dtype=k0.dtype, device=k0.device)
    for i, layer in enumerate(layers):
        k, v = layer.keys, layer.values
        if k.shape[1] != 1 or v.shape[1] != 1 or k.shape[-1] != split or k.shape[-1] + v.shape[-1] != width:
            raise LayoutError(
                f"layer {i}: an MLA latent cache needs keys [B, 1, T, {split}] and values [B, 1, T, "
                f"{width - split}], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.shape[-2] < num_tokens or v.shape[-2] < num_tokens:
            raise LayoutError(f"layer {i} holds {k.shape[-2]} positions, expected >= {num_tokens}")
        out[i, 0, :, 0, :split].copy_(k[batch_index, 0, :num_tokens])
        out[i, 0, :, 0, split:].copy_(v[batch_index, 0, :num_tokens])
    return out


def _split_planes(planes: torch.Tensor, latent_split: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[P, n, H, D]`` rows of one layer and batch row as ``[1, H, n, D]`` keys and values views
    (MLA: the single latent plane cut at ``latent_split``)."""
    if latent_split is None:
        return planes[0].transpose(0, 1).unsqueeze(0), planes[-1].transpose(0, 1).unsqueeze(0)
    row = planes[0].transpose(0, 1).unsqueeze(0)  # [1, 1, n, latent]
    return row[..., :latent_split], row[..., latent_split:]


def group_bounds(num_layers: int, group: int, taper: bool) -> list[int]:
    """Layer boundaries ``[0, ..., num_layers]`` of copy groups of ``group`` layers; with ``taper``
    the last ``group`` layers are split in halves down to one layer (``group`` 4: ..., 4, 2, 1, 1).
    Every layer is in exactly one group, groups in layer order."""
    if num_layers <= 0 or group <= 0:
        raise LayoutError(f"group_bounds needs layers and a group size > 0, got {num_layers}, {group}")
    bounds = [*range(0, num_layers, group), num_layers]
    if taper:
        at, left = bounds[-2], num_layers - bounds[-2]
        del bounds[-1]
        while left > 1:  # the first half (rounded up) as one group, then the rest likewise
            at += left - left // 2
            left //= 2
            bounds.append(at)
        bounds.append(num_layers)  # the last group: one layer
    return bounds


class LayerwiseKV:
    """Hands out one layer's cached prefix at a time, as ``[B, H, n, D]`` keys and values.

    ``rows`` holds one ``[L, 2, n, H, D]`` tensor per batch row (same ``n``). If a row already
    lives on ``device`` its layers are views. If it is on the host and ``device`` is CUDA,
    ``prefetch(i)`` enqueues layer ``i``'s copy on a side stream and records an event;
    ``take(i)`` makes the compute stream wait for that event only, so later layers keep copying
    while earlier ones compute.
    """

    def __init__(
        self, rows: list[torch.Tensor], device: torch.device, latent_split: int | None = None
    ) -> None:
        if not rows or any(r.dim() != 5 or r.shape != rows[0].shape for r in rows):
            raise LayoutError("LayerwiseKV needs one [L, 2, n, H, D] tensor per row, all of one shape")
        self.rows = rows
        self.latent_split = latent_split
        self.num_layers = int(rows[0].shape[0])
        self.num_tokens = int(rows[0].shape[2])
        self.device = device
        self._async = device.type == "cuda" and rows[0].device.type == "cpu"
        self._stream = side_stream(device) if self._async else None
        self._staged: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self.batch, self.planes = len(rows), int(rows[0].shape[1])
        self.heads, self.width, self.dtype = int(rows[0].shape[3]), int(rows[0].shape[4]), rows[0].dtype

    def prefetch(self, layer: int) -> None:
        if not self._async or layer >= self.num_layers or layer in self._staged:
            return
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dev = [r[layer].to(self.device, non_blocking=True) for r in self.rows]
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._staged[layer] = (dev, ev)

    def _layer_rows(self, layer: int) -> list[torch.Tensor]:
        """Layer ``layer``'s ``[P, n, H, D]`` rows, one per batch row, usable on the current stream."""
        if not self._async:
            return [r[layer] for r in self.rows]
        self.prefetch(layer)
        srcs, ev = self._staged.pop(layer)
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ev)
        for t in srcs:
            t.record_stream(main)
        return srcs

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (keys, values), usable by work enqueued next on the current stream."""
        srcs = self._layer_rows(layer)
        # [2, n, H, D] -> [1, H, n, D] views; DynamicLayer.update's cat makes them contiguous.
        pairs = [_split_planes(s, self.latent_split) for s in srcs]
        ks, vs = [k for k, _ in pairs], [v for _, v in pairs]
        if len(srcs) == 1:
            return ks[0], vs[0]
        return torch.cat(ks), torch.cat(vs)

    def fill(self, layer: int, dst: torch.Tensor) -> None:
        """Write layer ``layer``'s prefix into ``dst[:, b, :num_tokens]`` (``dst`` ``[P, B, >= n, H, W]``,
        kvtier's row order per batch row: one copy per row, no transpose), on the current stream.
        ``take`` hands out ``[B, H, n, D]`` views instead (for a cache that copies them itself)."""
        n = self.num_tokens
        srcs = self._layer_rows(layer)
        for b, src in enumerate(srcs):
            dst[:, b, :n].copy_(src)

    def close(self) -> None:
        """Called once every layer has been taken; views over tier memory are given back here."""


class ChunkedLayerwiseKV(LayerwiseKV):
    """A ``LayerwiseKV`` over the CPU tier's pinned chunk views (``CacheEngine.retrieve_chunks``).

    Layers are copied in groups of ``group_layers`` straight from the pool to the GPU on the
    side stream: nothing is assembled on the host, and group g+1 loads while group g computes.
    Why groups, not single layers: a chunk's layers ``[l0:l1]`` are one contiguous block of the
    pool, so a group costs one async memcpy per chunk; per-layer copies would be 8x more calls
    and their launch cost (~10 µs each from Python) lands on the thread that drives the forward.
    Why 4 layers (4 MiB per copy for a 256-token Llama-3-8B chunk) and ``AHEAD`` groups in flight:
    a full hit's TTFT is the whole transfer plus what runs after the last group arrives (that
    group's layers); 8-layer groups left ~4 ms of compute after the copy engine was done, so the
    last group is split down to one layer (``TAPER``). A group is one 2D DMA per run of chunks
    at a constant pitch in the pool (``ROWS2D``). The first groups are enqueued when the source
    is built, before the forward reaches layer 0.
    ``close`` waits for the copies and releases the views (their pins keep the pool from
    reusing the memory meanwhile).
    """

    def __init__(
        self,
        views: list[ChunkViews],
        num_tokens: int,
        device: torch.device,
        group_layers: int = 0,
        latent_split: int | None = None,
        num_layers: int = 0,
    ) -> None:
        """``num_layers``: 0 = the chunks' first dimension (a subclass over packed, flat chunks
        passes it)."""
        if device.type != "cuda" or not views or any(not v.chunks for v in views):
            raise LayoutError("ChunkedLayerwiseKV needs CUDA and a non-empty chunk list per row")
        first = views[0].chunks[0][1].kv
        self.views = views
        self.latent_split = latent_split
        self.num_layers = num_layers or int(first.shape[0])
        self.num_tokens = num_tokens
        self.device = device
        self.group_layers = group_layers or min(self.num_layers, self.GROUP_LAYERS)
        self._bounds = group_bounds(self.num_layers, self.group_layers, self.TAPER)
        self._group_of = [g for g in range(len(self._bounds) - 1) for _ in range(*self._bounds[g : g + 2])]
        self._async = True
        self._stream = side_stream(device)
        self._groups: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self._pinned = PinnedStorages()
        self._copy2d: Copy2D | None = available() if self.ROWS2D else None
        """The runtime's 2D copy (``ROWS2D`` on and found), else one DMA per chunk."""
        self.batch = len(views)
        self.planes, self.heads, self.width, self.dtype = self._dims(first)
        self.prefetch(0)

    def _dims(self, first: torch.Tensor) -> tuple[int, int, int, torch.dtype]:
        """(planes, heads, width, dtype) of the KV handed out, from the first chunk view."""
        return int(first.shape[1]), int(first.shape[3]), int(first.shape[4]), first.dtype

    def _stage_group(self, g: int) -> None:
        if g + 1 >= len(self._bounds) or g in self._groups:
            return
        l0, l1 = self._bounds[g], self._bounds[g + 1]
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dsts = self._stage(l0, l1)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._groups[g] = (dsts, ev)

    def _stage(self, l0: int, l1: int) -> list[torch.Tensor]:
        """Layers ``[l0, l1)`` of every row's chunks on the device as ``[chunks, l1 - l0, P, ct, H, D]``
        (enqueued on the side stream, the caller's context): one 2D DMA per run of chunks at a
        constant pitch in pinned memory (``chunk_runs``), one copy per chunk for the rest."""
        dsts = []
        copier = self._copy2d
        for v in self.views:
            first = v.chunks[0][1].kv
            ct = int(first.shape[2])
            shape = (
                len(v.chunks),
                l1 - l0,
                int(first.shape[1]),
                ct,
                int(first.shape[3]),
                int(first.shape[4]),
            )
            dst = torch.empty(shape, dtype=first.dtype, device=self.device)
            kvs = [chunk.kv for _, chunk in v.chunks]
            if copier is not None:
                runs, rest = chunk_runs(kvs, l0, l1, dst, self._pinned)
                for run in runs:
                    copy_rows(run, self._stream, copier)
            else:
                rest = list(enumerate(kvs))
            for c, kv in rest:
                n = int(kv.shape[2])
                target = dst[c] if n == ct else dst[c, :, :, :n]
                target.copy_(kv[l0:l1], non_blocking=True)
            dsts.append(dst)
        return dsts

    ROWS2D = True
    """One ``cudaMemcpy2DAsync`` per run of chunks the CPU tier stored one after another (a
    constant pitch in its arena) instead of one DMA per chunk: 128 DMAs of 4 MiB per group for a
    32k-token Llama-3-8B hit become one. ``grouped.ROWS2D`` measured the same trade on the H200:
    one DMA per 4 MiB piece 0.96x of a flat memcpy, one 2D DMA per group 0.998-1.0x."""

    GROUP_LAYERS = 4
    """Layers per copy (the default of ``group_layers``)."""
    AHEAD = 2
    """Groups kept in flight ahead of the one the forward is in."""

    TAPER = True
    """The last ``group_layers`` layers go as groups of half the size, down to one layer (4, 4, ...,
    4, 2, 1, 1), so what computes after the last copy lands is one layer, not a whole group. H100,
    32k-token Llama-3-8B hit: the device ran 2.3 ms after the last DMA with 4-layer groups
    (``profile_gpu_gaps.py --parts hf``); tapered, the hit was 16.13-16.66x faster than the prefill
    in four runs against 16.19-16.27x untapered in the same runs (``benchmarks/RESULTS.md``). A 2D
    DMA's fixed cost does not grow with the number of groups."""

    def _locate(self, layer: int) -> tuple[int, int, bool]:
        """(group, layer's index in it, whether it is the group's last layer)."""
        g = self._group_of[layer]
        j = layer - self._bounds[g]
        return g, j, layer == self._bounds[g + 1] - 1

    def prefetch(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            return
        g = self._group_of[layer]
        for h in range(g, g + 1 + self.AHEAD):
            self._stage_group(h)

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, j, last = self._locate(layer)
        self._stage_group(g)
        dsts, ev = self._groups[g]
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ev)
        ks, vs = [], []
        for dst in dsts:
            dst.record_stream(main)
            t = dst[:, j]  # [chunks, planes, ct, H, D]
            flat = t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3], t.shape[4])[:, : self.num_tokens]
            k, v = _split_planes(flat, self.latent_split)
            ks.append(k)
            vs.append(v)
        if last:
            del self._groups[g]  # the group's last layer: its buffers go when the forward is done
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks), torch.cat(vs)

    def fill(self, layer: int, dst: torch.Tensor) -> None:
        """As ``LayerwiseKV.fill``: the layer's rows go from its group's staging buffer (one DMA
        per chunk and group) to ``dst`` in two copies per row (whole chunks as one strided copy, then
        the partial last one), on the current stream once the group's DMAs are done. This replaces
        ``take``'s reshape copy and the cache's ``cat`` onto an empty tensor."""
        g, j, last = self._locate(layer)
        self._stage_group(g)
        staged, ev = self._groups[g]
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ev)
        p, h, w = dst.shape[0], dst.shape[3], dst.shape[4]
        for b, src in enumerate(staged):  # [chunks, group layers, P, ct, H, W]
            src.record_stream(main)
            ct = int(src.shape[3])
            full, rem = divmod(self.num_tokens, ct)
            if full:
                dst[:, b, : full * ct].view(p, full, ct, h, w).copy_(src[:full, j].transpose(0, 1))
            if rem:
                dst[:, b, full * ct : self.num_tokens].copy_(src[full, j, :, :rem])
        if last:
            del self._groups[g]  # the group's last layer: its buffers go when the copies are done

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        for v in self.views:
            v.release()
        self.views = []
