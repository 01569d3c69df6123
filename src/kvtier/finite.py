"""The NaN/Inf guard of a CPU store, run one chunk ahead of the puts on a helper thread.

``CacheEngine.store`` never stores non-finite KV: it keeps the chunks before the first one
holding a NaN/Inf and refuses that one and every later one (see ``engine.py``). Checking is
one pass over every byte (a sum), about as long as sending the chunk over a socket takes on
a CPU core; done up front it was ~28 % of a daemon TCP store (0.58x a raw socket vs 0.81x
without it, same run). Here chunk ``i + 1`` is checked on a helper thread while chunk ``i``
is put (torch's reductions and the tiers' copies and sends release the GIL), so the guard
overlaps the puts instead of preceding them.

Invariants:
* ``put(i)`` is called in order, only after chunk ``i`` was found finite, never for a chunk
  at or after the first non-finite one: the order and the refusals are those of the
  sequential guard.
* The check is exact: a sum that is not finite (NaN/Inf, or finite values that overflow in
  the KV dtype) is re-checked in float32, then element by element.
* Both threads only read the KV; the helper thread is the engine's and ends with ``close``.
  Its sums run on it alone (``kvtier.threads``: a team of its own slowed the engine's).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvtier.threads import one_omp_thread


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` (a ``[layers, planes, tokens, ...]`` chunk, any strides) holds no NaN/Inf.

    NOTE: each (layer, plane) row is summed first: a chunk cut from a larger store is a
    strided view, and torch's plain ``sum`` of one is ~15x slower on CPU than summing its
    contiguous rows (160 vs 9 ms per 32 MiB of bf16 here)."""
    try:
        rows = t.view(t.shape[0] * t.shape[1], -1) if t.dim() >= 3 else None
    except RuntimeError:  # rows not contiguous: no such view
        rows = None
    for dtype in (None, torch.float32):
        s = rows.sum(dim=1, dtype=dtype).sum() if rows is not None else t.sum(dtype=dtype)
        if bool(torch.isfinite(s)):
            return True
    return bool(torch.isfinite(t).all())


AHEAD_MIN_BYTES = 1 << 20
"""Chunks smaller than this are checked inline: their sum takes microseconds, less than handing
it to the helper thread, whose work would only compete with the tiers' own (timed) writes."""


class AheadChecker:
    """One helper thread per engine, started on first use."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def put_while_finite(self, chunks: Sequence[torch.Tensor], put: Callable[[int], bool]) -> list[bool]:
        """``put(i)``'s answers for the leading finite ``chunks`` (stops at the first that is not)."""
        if len(chunks) < 2 or chunks[0].numel() * chunks[0].element_size() < AHEAD_MIN_BYTES:
            out: list[bool] = []
            for i, c in enumerate(chunks):  # the sequential guard: nothing worth a thread hop
                if not all_finite(c):
                    break
                out.append(put(i))
            return out
        futs: list[Future[bool]] = [self._executor().submit(all_finite, c) for c in chunks]
        out = []
        try:
            for i, f in enumerate(futs):
                if not f.result():
                    break
                out.append(put(i))
        finally:
            for f in futs:
                f.cancel()
        return out

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="kvtier-finite", initializer=one_omp_thread
                )
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
