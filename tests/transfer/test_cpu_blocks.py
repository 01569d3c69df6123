"""``transfer.cpu_blocks`` writes and reads exactly what the per-block path (``blocks``) does."""

from __future__ import annotations

import torch

from kvtier.transfer.blocks import detect, gather_layer, scatter_pieces, token_index
from kvtier.transfer.cpu_blocks import block_rows, buffer_rows, cache_blocks, copy_blocks

L, H, D, BS, NB = 3, 2, 8, 16, 12


def test_block_copies_match_the_per_block_path_both_ways() -> None:
    g = torch.Generator().manual_seed(3)
    cache = [torch.randn((NB, H, BS, 2 * D), generator=g) for _ in range(L)]
    lay = detect(cache[0], num_kv_heads=H, head_dim=D, block_size=BS)
    chunks = [torch.randn((L, 2, 32, H, D), generator=g) for _ in range(3)]
    pieces = [(chunks[0], 16, 32), (chunks[1], 0, 32), (chunks[2], 0, 32)]  # a partial chunk, then whole ones
    blocks = [9, 2, 7, 0, 5]  # 80 tokens, shuffled blocks
    idx = token_index(blocks, 16, 16, 96, BS, torch.device("cpu"))
    rows = block_rows(pieces, L, 2, BS)
    assert rows is not None and len(rows[0]) == 2 * len(blocks)
    want, got = [torch.zeros_like(c) for c in cache], [torch.zeros_like(c) for c in cache]
    for layer in range(L):
        scatter_pieces(lay, want[layer], idx, [c[layer, :, a:b] for c, a, b in pieces])
        copy_blocks(cache_blocks(lay, got[layer], blocks), rows[layer])
        assert torch.equal(got[layer], want[layer])
    buf = torch.empty((L, 2, 80, H, D))
    out = buffer_rows(buf, BS)
    assert out is not None
    for layer in range(L):
        copy_blocks(out[layer], cache_blocks(lay, cache[layer], blocks))
        ref = torch.empty((2, 80, H, D))
        gather_layer(lay, cache[layer], idx, ref)
        assert torch.equal(buf[layer], ref)
    assert block_rows([(chunks[0], 8, 32)], L, 2, BS) is None  # not whole blocks: the caller falls back
