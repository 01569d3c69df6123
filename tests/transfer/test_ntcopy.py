"""``kernels.ntcopy``: the streaming-store row copy writes exactly memcpy's bytes (odd sizes,
misaligned ends, rows longer than a work piece, several jobs, one or two threads), nothing
outside the rows, and ``NativeBlocks`` through it equals the per-block scatter. Where it cannot
be used the reason is given and torch's copy runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from tests.transfer.test_native_blocks import _packed_arena, load_equals_scatter

from kvtier.transfer.blocks import detect, gather_layer, scatter_pieces, token_index
from kvtier.transfer.cpu_blocks import NativeBlocks
from kvtier.transfer.kernels import ntcopy

L, H, D, BS, NB = 3, 2, 8, 16, 12
CPU = torch.device("cpu")


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """Forget the loaded library before and after (a test changes what loading finds)."""
    ntcopy._load.cache_clear()
    yield
    ntcopy._load.cache_clear()


def _native() -> None:
    if ntcopy.library() is None:
        pytest.skip(f"native copy unavailable here: {ntcopy.describe()}")


def _i64(*xs: int) -> np.ndarray:
    return np.array(xs, np.int64)


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_memcpy_exact_and_nothing_else_is_written(threads: int) -> None:
    _native()
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=g)
    dst = torch.zeros(4 << 20, dtype=torch.uint8)
    # (dst offset, dst stride, src offset, src stride, rows, row bytes): short rows (no streaming),
    # a misaligned destination, rows of several 64 KiB pieces with a ragged end, a zero-row job
    jobs = [
        (3, 200, 5, 131, 7, 100),
        (5_001, 70_000, 11, 65_600, 9, 65_537),
        (1_000_000, 300_000, 700_000, 200_003, 4, 200_003),
        (2_500_000, 1_000, 0, 1_000, 0, 1_000),
        (3_000_000, 257, 2_000_000, 300, 255, 257),
    ]
    cols = list(zip(*jobs))
    base_d, base_s = dst.data_ptr(), src.data_ptr()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert ntcopy.copy_rows(
            np.array(cols[0], np.int64) + base_d,
            np.array(cols[1], np.int64),
            np.array(cols[2], np.int64) + base_s,
            np.array(cols[3], np.int64),
            np.array(cols[4], np.int64),
            np.array(cols[5], np.int64),
        )
    finally:
        torch.set_num_threads(old)
    want = torch.zeros_like(dst)
    for do, ds, so, ss, rows, rb in jobs:
        for r in range(rows):
            want[do + r * ds : do + r * ds + rb] = src[so + r * ss : so + r * ss + rb]
    assert torch.equal(dst, want)


def test_malformed_job_arrays_are_refused_before_anything_is_copied() -> None:
    _native()
    one = _i64(0)
    with pytest.raises(ntcopy.CopyError, match="contiguous int64"):
        ntcopy.copy_rows(one, one, one, one, _i64(1, 2), one)
    with pytest.raises(ntcopy.CopyError, match="negative"):
        ntcopy.copy_rows(one, one, one, one, _i64(-1), _i64(8))


@pytest.mark.parametrize("blocks", [[3, 4, 5, 6], [9, 2, 7, 0], [1, 3, 5, 6]])
def test_native_blocks_through_the_streaming_copy_equal_the_scatter_and_gather(
    blocks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _native()
    monkeypatch.setattr(ntcopy, "MIN_BYTES", 0)  # these blocks are small: take the native path anyway
    calls = []
    real = ntcopy.copy_rows
    monkeypatch.setattr(ntcopy, "copy_rows", lambda *a: calls.append(1) or real(*a))
    lay, cache, idx, _ = load_equals_scatter(blocks, 8)
    assert len(calls) == L
    flat = torch.full((len(blocks) * L * 2 * BS * H * D,), float("nan"))
    save = NativeBlocks.of_buffer(lay, flat, blocks, L)
    assert save is not None
    for layer in range(L):
        save.from_cache(layer, cache[layer])
    assert len(calls) == 2 * L
    back = NativeBlocks.of_buffer(lay, flat, blocks, L)
    assert back is not None
    for layer in range(L):
        got = torch.zeros_like(cache[layer])
        back.to_cache(layer, got)
        raw_got, raw_want = (torch.empty((2, BS * len(blocks), H, D)) for _ in range(2))
        gather_layer(lay, got, idx, raw_got)
        gather_layer(lay, cache[layer], idx, raw_want)
        assert torch.equal(raw_got, raw_want)


def test_a_cache_too_small_for_the_plan_is_not_written_by_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw path checks the cache's storage per call; a short one goes to torch's views,
    which refuse it (as before the native copy)."""
    _native()
    monkeypatch.setattr(ntcopy, "MIN_BYTES", 0)
    g = torch.Generator().manual_seed(5)
    raw = [torch.randn((L, 2, BS, H, D), generator=g) for _ in range(2)]
    packed = _packed_arena(raw, 0)
    lay = detect(torch.zeros((NB, H, BS, 2 * D)), num_kv_heads=H, head_dim=D, block_size=BS)
    plan = NativeBlocks.of_chunks(lay, [(p, BS, 0, BS) for p in packed], [NB - 2, NB - 1], L)
    assert plan is not None
    short = torch.zeros((NB - 1, H, BS, 2 * D))
    with pytest.raises(RuntimeError):
        plan.to_cache(0, short)
    assert not short.any()
    with pytest.raises(RuntimeError):
        plan.to_cache(L, torch.zeros((NB, H, BS, 2 * D)))  # no such layer in the chunks


def test_switched_off_the_reason_is_given_and_torch_copies(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ntcopy.ENV, "0")
    assert ntcopy.library() is None
    assert ntcopy.describe() == f"torch copy ({ntcopy.ENV}=0)"
    one = _i64(0)
    assert ntcopy.copy_rows(one, one, one, one, one, one) is False
    monkeypatch.setattr(ntcopy, "MIN_BYTES", 0)
    g = torch.Generator().manual_seed(6)
    raw = [torch.randn((L, 2, BS, H, D), generator=g) for _ in range(3)]
    lay = detect(torch.zeros((NB, H, BS, 2 * D)), num_kv_heads=H, head_dim=D, block_size=BS)
    plan = NativeBlocks.of_chunks(lay, [(p, BS, 0, BS) for p in _packed_arena(raw, 0)], [2, 3, 4], L)
    assert plan is not None
    got, want = torch.zeros((NB, H, BS, 2 * D)), torch.zeros((NB, H, BS, 2 * D))
    plan.to_cache(1, got)
    scatter_pieces(lay, want, token_index([2, 3, 4], 0, 0, 3 * BS, BS, CPU), [kv[1] for kv in raw])
    assert torch.equal(got, want)


def test_a_missing_compiler_is_a_logged_fallback(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger=ntcopy.__name__):
        assert ntcopy.library() is None
    assert "torch copy" in ntcopy.describe() and "no-such-cc" in ntcopy.describe()
    assert any("host block copies use torch's copy" in r.getMessage() for r in caplog.records)


def test_a_compiler_error_is_a_logged_fallback(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: out of cheese' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(fake))
    assert ntcopy.library() is None
    assert "could not build ntcopy.c: fatal: out of cheese" in ntcopy.describe()
    assert not list((tmp_path / "native").iterdir())  # no half-written library left behind


def test_another_openmp_runtime_than_torchs_is_refused(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy on a second thread team would fight torch's for the cores: torch's copy instead."""
    _native()
    ntcopy._load.cache_clear()
    monkeypatch.setattr(ntcopy, "_torch_openmp_symbol", lambda: None)
    assert ntcopy.library() is None
    assert "is not torch's (none)" in ntcopy.describe()
