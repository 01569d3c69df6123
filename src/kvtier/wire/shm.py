"""The daemon's CPU pool in POSIX shared memory, so same-host clients read and write it directly.

One ``/dev/shm`` file per daemon run holds a 4 KiB header page (magic, a random nonce, the
daemon's pid) followed by the arena of the CPU tier's ``HostBufferPool``. A client maps the
file read-write:

* a hit is handed out as *(offset, lease)*: the client views the chunk in place (no copy in the
  daemon, no bytes on the socket) and the engine's own copy into its output is the only copy;
* a store reserves pool space, the client copies its KV straight into it (the only copy), then
  commits; the chunk becomes visible to every client at commit.

Why a ``/dev/shm`` file + ``mmap`` rather than ``multiprocessing.shared_memory``: on Python 3.11
the latter registers every *attached* segment with the resource tracker, which unlinks it when
the attaching process exits (fixed only by ``track=False`` in 3.13), so an engine exiting would
delete the daemon's pool. A plain file also lets a restarted daemon find and delete the
segments of a daemon that was killed (``reap_stale_segments``).

Invariants:
* reserved space is not in the tier (no reader can see it, eviction cannot take it) until
  ``commit``; an uncommitted reservation is returned to the pool by ``abort`` (client gone or
  timed out), never leaked.
* a leased chunk is pinned in the pool (``MemoryObject.pin``); eviction skips it; the pin lapses
  after the pool's ``pin_timeout_s`` so a client that dies without releasing cannot pin memory
  forever. A client must finish reading a leased view well within that timeout.
* every page of the segment is allocated when it is made (``posix_fallocate``), after a
  ``statvfs`` check that names both sizes: a ``/dev/shm`` smaller than the pool (Docker's
  default is 64 MiB) is a one-line start-up error, never a SIGBUS on first touch in a client. A
  client maps a segment only if all its blocks are allocated; otherwise (or if it cannot open
  or map it at all) it moves KV over the socket.
* the mmap is never closed while tensors view it (torch does not hold a buffer export, so an
  explicit ``close`` would leave dangling views); dropping the last reference unmaps it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import secrets
import struct
from pathlib import Path
from typing import Any

import torch

from kvtier.errors import KVTierError
from kvtier.memory import ALIGN_BYTES

log = logging.getLogger(__name__)

HEADER_BYTES = 4096
SHM_MAGIC = b"KVTSHM01"
_HEADER = struct.Struct("<8s16sQ")  # magic, nonce, pid
_NAME_RE = re.compile(r"^kvtier-pool-(\d+)-[0-9a-f]{16}$")


class SegmentError(KVTierError, OSError):
    """The shared segment is missing, another daemon's, or asked for a range outside its arena
    (an ``OSError``: callers fall back to the socket path on it)."""


class SharedSegment:
    """A header page + arena in one shared-memory file, mapped read-write."""

    def __init__(self, path: Path, mm: mmap.mmap, nonce: bytes, arena_bytes: int, owner: bool) -> None:
        self.path = path
        self.nonce = nonce
        self.arena_bytes = arena_bytes
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        self._cuda_registered = False
        whole = torch.frombuffer(mm, dtype=torch.uint8)
        self.arena = whole[HEADER_BYTES : HEADER_BYTES + arena_bytes]
        """The arena as a uint8 tensor; offsets in the protocol are relative to it."""

    @classmethod
    def create(
        cls, directory: str | os.PathLike[str], arena_bytes: int, *, prefault: bool = True
    ) -> SharedSegment:
        """A fresh segment named after this pid; sparse until written (tmpfs allocates on touch)."""
        nonce = secrets.token_bytes(16)
        path = Path(directory) / f"kvtier-pool-{os.getpid()}-{secrets.token_hex(8)}"
        size = HEADER_BYTES + arena_bytes
        st = os.statvfs(directory)
        if st.f_bavail * st.f_frsize < size:
            raise SegmentError(_no_room(directory, st.f_bavail * st.f_frsize, size))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            try:  # every page now: on tmpfs a page that cannot be had later is a SIGBUS on touch
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                st = os.statvfs(directory)
                raise SegmentError(_no_room(directory, st.f_bavail * st.f_frsize, size)) from None
            # MAP_POPULATE: fault every page in now (tmpfs first-touch faults cost more than the
            # copy itself and would land on the first requests); RSS is the capacity from the start
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if prefault else 0)
            mm = mmap.mmap(fd, size, flags=flags)
        except OSError:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mm[: _HEADER.size] = _HEADER.pack(SHM_MAGIC, nonce, os.getpid())
        return cls(path, mm, nonce, arena_bytes, owner=True)

    @classmethod
    def attach(cls, path: str, arena_bytes: int, nonce: bytes) -> SharedSegment:
        """Map a daemon's segment; raises ``OSError`` if it is absent or is not the one announced
        (another host, another daemon run)."""
        fd = os.open(path, os.O_RDWR)
        try:
            fst = os.fstat(fd)
            size = fst.st_size
            if size != HEADER_BYTES + arena_bytes:
                raise SegmentError(
                    f"shared segment {path} has {size} bytes, expected {HEADER_BYTES + arena_bytes}"
                )
            if fst.st_blocks * 512 < size:  # sparse: touching a page its filesystem lacks is SIGBUS
                raise SegmentError(
                    f"shared segment {path} has only {fst.st_blocks * 512} of {size} bytes allocated"
                )
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, got_nonce, _pid = _HEADER.unpack(mm[: _HEADER.size])
        if magic != SHM_MAGIC or got_nonce != nonce:
            raise SegmentError(f"shared segment {path} belongs to another daemon (nonce mismatch)")
        return cls(Path(path), mm, nonce, arena_bytes, owner=False)

    def register_cuda(self) -> bool:
        """Page-lock the mapping for CUDA (``cudaHostRegister``), so GPU copies from leased views
        run at pinned-memory speed, as from the in-process pinned pool; ``False`` if refused."""
        rc = torch.cuda.cudart().cudaHostRegister(self.arena.data_ptr(), self.arena_bytes, 0)
        ok = rc == 0 or getattr(rc, "value", None) == 0
        if ok:
            self._cuda_registered = True
        else:
            log.warning("cudaHostRegister of the shared pool failed (%s); GPU copies use pageable speed", rc)
        return bool(ok)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor viewing ``shape``/``dtype`` at arena ``offset``; raises ``ValueError`` out of range."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if offset < 0 or offset + nbytes > self.arena_bytes or offset % ALIGN_BYTES:
            raise SegmentError(
                f"range {offset}+{nbytes} is outside the {self.arena_bytes}-byte arena or unaligned"
            )
        return self.arena[offset : offset + nbytes].view(dtype).view(shape)

    def offset_of(self, t: torch.Tensor) -> int | None:
        """Arena offset of a tensor that views this segment, else ``None``."""
        base = self.arena.data_ptr()
        p = t.data_ptr()
        nbytes = t.numel() * t.element_size()
        if base <= p and p + nbytes <= base + self.arena_bytes and t.is_contiguous():
            return p - base
        return None

    def close(self) -> None:
        """Forget the mapping (unmapped when the last view dies) and, as owner, unlink the file."""
        if self._cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.arena.data_ptr())
            self._cuda_registered = False
        self._mm = None
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _no_room(directory: str | os.PathLike[str], free: int, need: int) -> str:
    return (
        f"{directory} has {free / 2**20:.1f} MiB free but the CPU pool needs {need / 2**20:.1f} MiB: "
        f"run the container with a larger --shm-size (Docker's default is 64m; e.g. "
        f"--shm-size={-(-need // 2**20) + 64}m), lower --cpu-size, or point --shm-dir at a larger tmpfs"
    )


def reap_stale_segments(directory: str | os.PathLike[str]) -> list[Path]:
    """Unlink pool segments whose daemon process is gone (left by a SIGKILLed daemon)."""
    reaped = []
    for p in Path(directory).glob("kvtier-pool-*"):
        m = _NAME_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            p.unlink()
            reaped.append(p)
        except OSError as e:
            log.warning("could not remove stale segment %s: %s", p, e)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (copying only if it is not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def bytes_view(t: torch.Tensor) -> memoryview:
    """A memoryview of a CPU tensor's bytes (no copy if it is contiguous)."""
    arr: Any = as_bytes(t).numpy()
    return memoryview(arr)
