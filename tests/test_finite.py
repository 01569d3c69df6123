"""The NaN/Inf guard of CPU stores, run one chunk ahead of the puts (``kvtier/finite.py``)."""

from __future__ import annotations

import threading

import pytest
import torch

from kvtier import finite
from kvtier.finite import AheadChecker, all_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_in_a_strided_chunk(dtype: torch.dtype, bad: float) -> None:
    kv = torch.randn(3, 2, 64, 2, 8).to(dtype)
    chunk = kv[:, :, 16:32]  # a token range of a larger store: not contiguous
    assert not chunk.is_contiguous() and all_finite(chunk)
    for where in [(0, 0, 0, 0, 0), (2, 1, 15, 1, 7), (1, 0, 7, 1, 2)]:
        c = chunk.clone()
        c[where] = bad
        assert not all_finite(c) and not all_finite(torch.cat([kv[:, :, :16], c], dim=2)[:, :, 16:32])


def test_all_finite_keeps_large_finite_values_and_odd_layouts() -> None:
    assert all_finite(torch.full((2, 2, 16, 2, 8), 60000.0, dtype=torch.float16))  # row sums overflow
    t = torch.randn(2, 2, 8, 4, 16).transpose(3, 4)  # rows not viewable: the plain path
    assert all_finite(t)
    t[1, 1, 3, 2, 1] = float("nan")
    assert not all_finite(t)


@pytest.mark.parametrize("ahead", [True, False])
def test_puts_stop_before_the_first_non_finite_chunk_in_order(
    monkeypatch: pytest.MonkeyPatch, ahead: bool
) -> None:
    monkeypatch.setattr(finite, "AHEAD_MIN_BYTES", 0 if ahead else 1 << 40)  # the helper thread, or inline
    chunks = [torch.randn(2, 2, 4, 1, 4) for _ in range(6)]
    chunks[3][1, 0, 2, 0, 1] = float("inf")
    seen: list[int] = []
    threads: set[int] = set()

    def put(i: int) -> bool:
        seen.append(i)
        threads.add(threading.get_ident())
        return i != 1  # a tier's own refusal is passed through, and does not stop the store

    checker = AheadChecker()
    try:
        assert checker.put_while_finite(chunks, put) == [True, False, True]
        assert seen == [0, 1, 2] and threads == {threading.get_ident()}  # puts on the caller's thread
        assert checker.put_while_finite(chunks[:1], put) == [True]
        assert checker.put_while_finite(chunks[3:4], put) == [] and checker.put_while_finite([], put) == []
    finally:
        checker.close()
