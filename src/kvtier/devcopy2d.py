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
import threading
from typing import Any

from kvtier.errors import KVTierError

KIND_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from unified addressing


class Copy2DError(KVTierError, RuntimeError):
    """``cudaMemcpy2DAsync`` returned an error code."""


_lock = threading.Lock()
_fn: Any = None
_why_not: str | None = "not probed"


def _find() -> tuple[Any, str | None]:
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device"
        torch.cuda.init()
    except ImportError:
        return None, "torch is not installed"
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.rsplit(" ", 1)[-1].strip()
                if "libcudart.so" in p and p not in paths:
                    paths.append(p)
    except OSError:
        pass
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

    def copy(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: Any) -> None:
        if self._fn is None:
            raise Copy2DError(f"2D copy unavailable: {self.why_not}")
        handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
        rc = self._fn(dst, dpitch, src, spitch, width, height, KIND_DEFAULT, handle)
        if rc != 0:
            raise Copy2DError(
                f"cudaMemcpy2DAsync failed with error {rc} (width {width}, height {height}, "
                f"pitches {spitch}/{dpitch}); the per-piece copy path is used instead"
            )
