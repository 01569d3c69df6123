"""``layerwise.chunk_runs``: a hit's chunk views as 2D copies, one per run of chunks at a constant
pitch in the CPU tier's arena (the address math runs here through ``copy_rows``' CPU emulation;
the CUDA path is ``tests/integrations/test_hf_transformers.py``'s GPU tests); ``group_bounds``:
the layer groups those copies move, tapered at the end."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvtier.config import Config
from kvtier.devcopy2d import copy_rows
from kvtier.engine import CacheEngine
from kvtier.transfer.layerwise import chunk_runs, group_bounds
from kvtier.transfer.layout import LayoutError

CT = 16
LAYERS, HEADS, DIM = 6, 2, 8


def _engine() -> CacheEngine:
    cfg = Config.load(
        env={}, chunk_tokens=CT, cpu__max_bytes="64MiB", cpu__pin_memory="no", cost__enabled=False
    )
    eng = CacheEngine(cfg)
    eng.bind_model(LAYERS, HEADS, DIM, torch.float32)
    return eng


def _staged(
    kvs: list[torch.Tensor], l0: int, l1: int, pinned: bool = True
) -> tuple[torch.Tensor, int, list[int]]:
    """Layers [l0, l1) of ``kvs`` copied as ``ChunkedLayerwiseKV._stage`` does: (dst, runs, rest indices)."""
    first = kvs[0]
    dst = torch.full((len(kvs), l1 - l0, 2, CT, HEADS, DIM), float("nan"))
    runs, rest = chunk_runs(kvs, l0, l1, dst, lambda _t: pinned)
    for run in runs:
        copy_rows(run, None, None)
    for c, kv in rest:
        n = int(kv.shape[2])
        dst[c, :, :, :n].copy_(kv[l0:l1])
    assert first.dtype == dst.dtype
    return dst, len(runs), [c for c, _ in rest]


def test_chunks_stored_together_are_one_run_and_land_bit_exact() -> None:
    tokens = list(range(5 * CT + 7))  # five full chunks and a partial tail
    kv = torch.randn(LAYERS, 2, len(tokens), HEADS, DIM)
    with _engine() as eng:
        assert eng.store(tokens, kv) == len(tokens)
        with eng.retrieve_chunks(tokens) as views:
            kvs = [c.kv for _, c in views.chunks]
            assert len(kvs) == 6
            dst, runs, rest = _staged(kvs, 2, 5)
    assert runs == 1  # the five full chunks sit at one pitch: one DMA
    assert rest == [5]  # the partial tail is copied on its own
    for c in range(6):
        n = min(CT, len(tokens) - c * CT)
        torch.testing.assert_close(dst[c, :, :, :n], kv[2:5, :, c * CT : c * CT + n], atol=0, rtol=0)


def test_chunks_in_other_storages_or_pageable_memory_are_not_merged() -> None:
    """Chunks of separate tensors start new runs (a single row each); ``pinned`` false keeps them
    all out of the 2D path, where the per-chunk copy is the safe one."""
    kvs = [torch.randn(LAYERS, 2, CT, HEADS, DIM) for _ in range(3)]
    dst, runs, rest = _staged(kvs, 0, LAYERS)
    assert runs == 3 and rest == []
    for c in range(3):
        torch.testing.assert_close(dst[c], kvs[c], atol=0, rtol=0)
    dst, runs, rest = _staged(kvs, 1, 2, pinned=False)
    assert runs == 0 and rest == [0, 1, 2]
    for c in range(3):
        torch.testing.assert_close(dst[c], kvs[c][1:2], atol=0, rtol=0)


def test_a_non_contiguous_chunk_is_copied_on_its_own() -> None:
    base = torch.randn(LAYERS, 2, 2 * CT, HEADS, DIM)
    kvs = [base[:, :, :CT], base[:, :, CT:]]  # views with a token stride: not one block per layer
    dst, runs, rest = _staged(kvs, 0, 3)
    assert runs == 0 and rest == [0, 1]
    torch.testing.assert_close(dst[1], base[:3, :, CT:], atol=0, rtol=0)


@pytest.mark.parametrize("layers", [1, 2, 3, 5, 7, 30, 32])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_layer_groups_cover_every_layer_once_and_taper_to_one(layers: int, group: int) -> None:
    full = len(range(0, layers, group)) - 1  # groups before the last one
    for taper in (False, True):
        b = group_bounds(layers, group, taper)
        assert b[0] == 0 and b[-1] == layers and all(x < y for x, y in itertools.pairwise(b))
        sizes = [y - x for x, y in itertools.pairwise(b)]
        assert max(sizes) <= group and sizes[:full] == [group] * full
        if taper:
            assert sizes[-1] == 1  # one layer computes after the last copy lands
        else:
            assert len(sizes) == full + 1
    assert group_bounds(32, 4, True)[-4:] == [28, 30, 31, 32]
    assert group_bounds(32, 8, True)[-5:] == [24, 28, 30, 31, 32]


def test_group_bounds_refuses_nothing_to_group() -> None:
    with pytest.raises(LayoutError, match="group size"):
        group_bounds(32, 0, True)
