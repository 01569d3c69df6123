"""Which parts of a prompt are reusable segments: validation and separator splitting.

A *segment* is a span ``[start, end)`` of a prompt whose KV may be reused wherever the same
tokens appear (a RAG document). Callers name segments explicitly (``segments=[(s, e), ...]``) or
give a separator token sequence that splits the prompt (LMCache's convention for prompts built
by string concatenation).

Invariants:
* ``check_segments`` returns spans sorted by start, each non-empty, inside ``[0, seq)``, and
  pairwise disjoint; anything else is a ``BlendError`` naming the offending span.
* The last prompt token never lies in a segment: the model needs its fresh hidden state to
  produce logits, so a span that reaches the end is refused rather than silently clipped.
* ``split_on_separator`` never makes the separator tokens or the text after the last
  separator (the question) part of a segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from kvtier.errors import KVTierError
from kvtier.keys import TokenInput, tokens_to_array

Span = tuple[int, int]


class BlendError(KVTierError, ValueError):
    """Bad segments, ratio or model for blending (the message names the problem and the fix)."""


def check_ratio(recompute_ratio: float) -> float:
    r = float(recompute_ratio)
    if not 0.0 <= r <= 1.0:
        raise BlendError(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
    return r


def check_segments(segments: Sequence[Sequence[int]], seq: int) -> list[Span]:
    """Validate ``segments`` against a prompt of ``seq`` tokens; sorted, disjoint spans."""
    spans: list[Span] = []
    for i, seg in enumerate(segments):
        try:
            s, e = (int(x) for x in seg)
        except (TypeError, ValueError):
            raise BlendError(f"segment {i} must be a (start, end) pair of ints, got {seg!r}") from None
        if not 0 <= s < e <= seq:
            raise BlendError(
                f"segment {i} = ({s}, {e}) is empty or outside the prompt of {seq} tokens: "
                "use 0 <= start < end <= len(prompt)"
            )
        if e == seq:
            raise BlendError(
                f"segment {i} = ({s}, {e}) ends at the last prompt token; keep at least the last token "
                "(the question) outside every segment so it is computed fresh"
            )
        spans.append((s, e))
    spans.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(spans):
        if s1 < e0:
            raise BlendError(f"segments ({s0}, {e0}) and ({s1}, {e1}) overlap; segments must be disjoint")
    return spans


def split_on_separator(tokens: TokenInput, separator: Sequence[int]) -> list[Span]:
    """Spans between occurrences of ``separator`` in ``tokens``; the piece after the last one is not a segment.

    ``[sys] SEP [doc1] SEP [doc2] SEP [question]`` gives the spans of ``sys``, ``doc1`` and
    ``doc2``. Empty pieces are skipped. No separator in the prompt: no segments.
    """
    sep = [int(t) for t in separator]
    if not sep:
        raise BlendError("separator must be a non-empty token sequence")
    arr = tokens_to_array(tokens).astype(np.int64)
    n, m = int(arr.size), len(sep)
    hits: list[int] = []
    i = 0
    sep_arr = np.asarray(sep, dtype=np.int64)
    while i + m <= n:
        if arr[i] == sep[0] and np.array_equal(arr[i : i + m], sep_arr):
            hits.append(i)
            i += m
        else:
            i += 1
    spans: list[Span] = []
    start = 0
    for h in hits:
        if h > start:
            spans.append((start, h))
        start = h + m
    return spans
