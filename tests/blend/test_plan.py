"""Segment spans: validation and separator splitting."""

from __future__ import annotations

import pytest

from kvtier.blend import BlendError, check_ratio, check_segments, split_on_separator


def test_segments_are_sorted_and_kept() -> None:
    assert check_segments([(10, 20), [2, 5]], 30) == [(2, 5), (10, 20)]


@pytest.mark.parametrize(
    ("segs", "needle"),
    [
        ([(5, 5)], "empty or outside"),
        ([(-1, 3)], "empty or outside"),
        ([(3, 31)], "empty or outside"),
        ([(3, 30)], "last prompt token"),
        ([(0, 10), (9, 12)], "overlap"),
        ([(1,)], "pair of ints"),
        ([("a", 2)], "pair of ints"),
    ],
)
def test_bad_segments_are_clear_errors(segs: list, needle: str) -> None:
    with pytest.raises(BlendError, match=needle):
        check_segments(segs, 30)


def test_ratio_out_of_range() -> None:
    assert check_ratio(0) == 0.0
    with pytest.raises(BlendError, match=r"recompute_ratio must be in \[0, 1\]"):
        check_ratio(1.5)


def test_separator_split() -> None:
    sep = [7, 7]
    toks = [1, 2, 7, 7, 3, 4, 5, 7, 7, 7, 7, 6, 7, 7, 9, 9]
    #       sys    | doc (4,7)  | empty   |doc |  question
    assert split_on_separator(toks, sep) == [(0, 2), (4, 7), (11, 12)]
    assert split_on_separator([1, 2, 3], sep) == []
    with pytest.raises(BlendError, match="non-empty"):
        split_on_separator(toks, [])
