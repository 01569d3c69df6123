"""``transfer.cpu_blocks`` writes and reads exactly what the per-block path (``blocks``) does,
whatever runs of blocks it finds."""

from __future__ import annotations

import pytest
import torch

from kvtier.transfer.blocks import detect, gather_layer, scatter_pieces, token_index
from kvtier.transfer.cpu_blocks import HostBlocks

L, H, D, BS, NB = 3, 2, 8, 16, 12
CPU = torch.device("cpu")


def _arena_chunks(n: int, tokens: int, g: torch.Generator, gap: int = 0) -> list[torch.Tensor]:
    """``n`` chunks ``[L, 2, tokens, H, D]`` at a fixed stride in one storage (as the CPU tier's pool)."""
    size = L * 2 * tokens * H * D
    arena = torch.randn(n * (size + gap) + 5, generator=g)
    return [
        arena[5 + i * (size + gap) : 5 + i * (size + gap) + size].view(L, 2, tokens, H, D) for i in range(n)
    ]


def _check_both_ways(
    pieces: list[tuple[torch.Tensor, int, int]], blocks: list[int], first: int
) -> HostBlocks:
    g = torch.Generator().manual_seed(3)
    cache = [torch.randn((NB, H, BS, 2 * D), generator=g) for _ in range(L)]
    lay = detect(cache[0], num_kv_heads=H, head_dim=D, block_size=BS)
    n = sum(b - a for _, a, b in pieces)
    idx = token_index(blocks, first, first, first + n, BS, CPU)
    plan = HostBlocks.of_pieces(lay, pieces, blocks, L)
    assert plan is not None
    want, got = [c.clone() for c in cache], [c.clone() for c in cache]
    for layer in range(L):
        scatter_pieces(lay, want[layer], idx, [c[layer, :, a:b] for c, a, b in pieces])
        plan.to_cache(layer, got[layer])
        assert torch.equal(got[layer], want[layer])
    buf = torch.empty((L, 2, n, H, D))
    out = HostBlocks.of_buffer(lay, buf, blocks)
    assert out is not None
    for layer in range(L):
        out.from_cache(layer, cache[layer])
        ref = torch.empty((2, n, H, D))
        gather_layer(lay, cache[layer], idx, ref)
        assert torch.equal(buf[layer], ref)
    return plan


def test_shuffled_blocks_of_separate_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn((L, 2, 32, H, D), generator=g) for _ in range(3)]
    pieces = [(chunks[0], 16, 32), (chunks[1], 0, 32), (chunks[2], 0, 32)]  # a partial chunk, then whole ones
    plan = _check_both_ways(pieces, [9, 2, 7, 0, 5], 16)
    # within a chunk the rows step by one block and the blocks by +5: its two blocks are one run
    assert [r.count for r in plan.runs] == [1, 2, 2]


@pytest.mark.parametrize("gap", [0, 7])
def test_arena_chunks_into_consecutive_blocks_are_one_run(gap: int) -> None:
    g = torch.Generator().manual_seed(2)
    chunks = _arena_chunks(4, BS, g, gap)
    plan = _check_both_ways([(c, 0, BS) for c in chunks], [3, 4, 5, 6], 0)
    assert [r.count for r in plan.runs] == [4]


def test_runs_break_where_either_side_stops_stepping() -> None:
    g = torch.Generator().manual_seed(4)
    chunks = _arena_chunks(5, BS, g)
    other = torch.randn((L, 2, BS, H, D), generator=g)  # another storage in the middle
    pieces = [(chunks[0], 0, BS), (chunks[1], 0, BS), (other, 0, BS), (chunks[3], 0, BS), (chunks[4], 0, BS)]
    plan = _check_both_ways(pieces, [0, 2, 4, 10, 11], 0)  # block step 2, then 1
    assert [r.count for r in plan.runs] == [2, 1, 2]
    plan = _check_both_ways([(c, 0, BS) for c in chunks], [1, 2, 3, 8, 9], 0)
    assert [r.count for r in plan.runs] == [3, 2]
    plan = _check_both_ways([(c, 0, BS) for c in reversed(chunks)], [1, 2, 3, 4, 5], 0)  # host steps back
    assert [r.count for r in plan.runs] == [1] * 5


def test_chunks_of_two_blocks_and_partial_pieces() -> None:
    g = torch.Generator().manual_seed(5)
    chunks = _arena_chunks(3, 2 * BS, g)
    pieces = [(chunks[0], BS, 2 * BS), (chunks[1], 0, 2 * BS), (chunks[2], 0, BS)]
    plan = _check_both_ways(pieces, [4, 5, 6, 7], BS)
    assert sum(r.count for r in plan.runs) == 4


def test_not_whole_blocks_is_refused() -> None:
    g = torch.Generator().manual_seed(6)
    cache = torch.zeros((NB, H, BS, 2 * D))
    lay = detect(cache, num_kv_heads=H, head_dim=D, block_size=BS)
    chunk = torch.randn((L, 2, 32, H, D), generator=g)
    assert HostBlocks.of_pieces(lay, [(chunk, 8, 32)], [0], L) is None  # the caller falls back
    assert HostBlocks.of_pieces(lay, [(chunk, 0, 32)], [0], L) is None  # blocks do not match the rows
    assert HostBlocks.of_pieces(lay, [(chunk[:, :, :, :1], 0, 32)], [0, 1], L) is None  # other heads


def test_host_rows_whose_layers_and_planes_do_not_merge() -> None:
    g = torch.Generator().manual_seed(7)
    kv = torch.randn((L, 3, 2 * BS, H, D), generator=g)[:, :2]  # plane stride * 2 != layer stride
    plan = _check_both_ways([(kv, 0, 2 * BS)], [6, 7], 0)
    assert [r.count for r in plan.runs] == [2]
