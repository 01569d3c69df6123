"""One strided DMA for many equal-size pieces: ``cudaMemcpy2DAsync`` through the CUDA runtime.

The vLLM worker's load moves, per group of layers, one ``G``-layer block of every chunk: 128
copies of ``G`` MiB for 32k tokens, each paying the copy engine's fixed cost per DMA. Chunks the
CPU tier stored one after another sit at a constant pitch in its arena (first-fit), so the
blocks of a group are rows of one 2D region: one ``cudaMemcpy2DAsync`` (rows of ``width`` bytes,
``spitch`` apart on the source, ``dpitch`` on the destination) moves them all.

torch exposes no 2D memcpy, so this calls the runtime library torch itself loaded (found in the
process's memory map, so it is the same library and context), through ``ctypes``. Written here
because no maintained package offers it without a second CUDA runtime.

Invariants:
* Addresses are raw device / pinned host pointers; the caller keeps both alive (and pinned) until
  the stream passes the copy, exactly as for ``copy_(non_blocking=True)``.
* ``Copy2D().why_not`` is ``None`` only where the symbol was found; callers use their per-piece
  path otherwise. A failing call raises ``Copy2DError`` (nothing was enqueued).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import KVTierError
from kvtier.threads import loaded_libraries

log = logging.getLogger(__name__)

KIND_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from unified addressing


class Copy2DError(KVTierError, RuntimeError):
    """``cudaMemcpy2DAsync`` returned an error code."""


_lock = threading.Lock()
_fn: Any = None
_why_not: str | None = "not probed"


def _find() -> tuple[Any, str | None]:
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    torch.cuda.init()
    paths = [p for p in loaded_libraries() if "libcudart.so" in os.path.basename(p)]
    for p in [*paths, "libcudart.so", "libcudart.so.13", "libcudart.so.12"]:
        try:
            lib = ctypes.CDLL(p)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        return fn, None
    return None, "libcudart with cudaMemcpy2DAsync not found in this process"


class Copy2D:
    """``copy(dst, dpitch, src, spitch, width, height, stream)`` as one DMA on ``stream``."""

    def __init__(self) -> None:
        global _fn, _why_not
        with _lock:
            if _why_not == "not probed":
                _fn, _why_not = _find()
        self._fn = _fn
        self.why_not = _why_not

    def copy(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: Any
    ) -> None:
        if self._fn is None:
            raise Copy2DError(f"2D copy unavailable: {self.why_not}")
        handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
        rc = self._fn(dst, dpitch, src, spitch, width, height, KIND_DEFAULT, handle)
        if rc != 0:
            raise Copy2DError(
                f"cudaMemcpy2DAsync failed with error {rc} (width {width}, height {height}, "
                f"pitches {spitch}/{dpitch}); the per-piece copy path is used instead"
            )


def available() -> Copy2D | None:
    """The runtime's 2D copy, or ``None`` where it was not found (callers copy per piece)."""
    copier = Copy2D()
    return copier if copier.why_not is None else None


class PinnedStorages:
    """``pinned(t)``: whether host tensor ``t``'s storage is page-locked, asked of the runtime once
    per storage (``is_pinned`` is a driver call; a load asks it for every piece)."""

    def __init__(self) -> None:
        self._known: dict[int, bool] = {}

    def __call__(self, t: torch.Tensor) -> bool:
        key = t.untyped_storage().data_ptr()
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = t.device.type == "cpu" and bool(t.is_pinned())
        return known


@dataclass
class Rows:
    """One 2D copy: ``height`` rows of ``width`` bytes from ``src_ptr`` (rows ``spitch`` apart) to
    ``dst_ptr`` (``dpitch`` apart). ``src``/``dst``: tensors of the storages the pointers lie in
    (kept alive by the caller; the CPU emulation views them)."""

    src: torch.Tensor
    src_ptr: int
    dst: torch.Tensor
    dst_ptr: int
    width: int
    height: int = 1
    spitch: int = 0
    dpitch: int = 0

    def extend(self, src: torch.Tensor, src_ptr: int, dst: torch.Tensor, dst_ptr: int, width: int) -> bool:
        """Append the row at (``src_ptr``, ``dst_ptr``) if it continues this run at constant pitches
        on the same storages (``False``: start a new run)."""
        if width != self.width or src.untyped_storage().data_ptr() != self.src.untyped_storage().data_ptr():
            return False
        if dst.untyped_storage().data_ptr() != self.dst.untyped_storage().data_ptr():
            return False
        if self.height == 1:
            sp, dp = src_ptr - self.src_ptr, dst_ptr - self.dst_ptr
            if sp < width or dp < width:  # rows must not overlap (and keep their order)
                return False
            self.spitch, self.dpitch = sp, dp
        elif (
            src_ptr != self.src_ptr + self.height * self.spitch
            or dst_ptr != self.dst_ptr + self.height * self.dpitch
        ):
            return False
        self.height += 1
        return True


def add_row(
    runs: list[Rows], src: torch.Tensor, src_ptr: int, dst: torch.Tensor, dst_ptr: int, width: int
) -> None:
    """Append a row of ``width`` bytes to the last run of ``runs`` where it continues it
    (``Rows.extend``), else start a new run with it."""
    if not runs or not runs[-1].extend(src, src_ptr, dst, dst_ptr, width):
        runs.append(Rows(src, src_ptr, dst, dst_ptr, width))


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor over ``t``'s whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def copy_rows(run: Rows, stream: Any, copier: Copy2D | None) -> None:
    """Enqueue ``run`` on ``stream``: one ``cudaMemcpy2DAsync`` with a ``copier``, else the same
    bytes through torch views (the CPU, where the tests run the run-building logic). A 2D call
    the runtime refuses is copied row by row instead (one warning per process): never a failed load."""
    if copier is not None:
        try:
            copier.copy(
                run.dst_ptr,
                run.dpitch or run.width,
                run.src_ptr,
                run.spitch or run.width,
                run.width,
                run.height,
                stream,
            )
            return
        except Copy2DError as e:
            _warn_once(e)
    sp, dp = run.spitch or run.width, run.dpitch or run.width
    sb, db = _bytes_of(run.src), _bytes_of(run.dst)
    s_off = run.src_ptr - run.src.untyped_storage().data_ptr()
    d_off = run.dst_ptr - run.dst.untyped_storage().data_ptr()
    cuda = run.src.device.type == "cuda" or run.dst.device.type == "cuda"
    if not cuda:
        src = sb.as_strided((run.height, run.width), (sp, 1), s_off)
        dst = db.as_strided((run.height, run.width), (dp, 1), d_off)
        dst.copy_(src)
        return
    with torch.cuda.stream(stream):  # one flat DMA per row, as the per-piece path does
        for h in range(run.height):
            d = db.as_strided((run.width,), (1,), d_off + h * dp)
            d.copy_(sb.as_strided((run.width,), (1,), s_off + h * sp), non_blocking=True)


_warned = False


def _warn_once(e: Copy2DError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("kvtier: %s", e)
