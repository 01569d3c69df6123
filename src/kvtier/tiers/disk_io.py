"""Low-level file I/O for the disk tier: full reads/writes, fsync, and pipelined chunk I/O.

A chunk file is ``HEADER_BYTES`` of header followed by the payload. Payloads of two
``PIECE_BYTES`` or more move in pieces on an executor's threads while the calling thread hashes
them (xxh3; the hasher releases the GIL, as do ``pread``/``pwrite``), so a chunk costs about
max(I/O, hash) rather than their sum. Every function here returns only once all I/O it started
has finished, so the caller may close the fd and reuse the buffer at once.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from pathlib import Path

from kvtier.serde import HEADER_BYTES
from kvtier.serde.base import new_hasher
from kvtier.serde.codec import Buffer

PIECE_BYTES = 4 * 1024**2  # unit of pipelined I/O; payloads under two pieces go in one syscall


def pipelined(nbytes: int) -> bool:
    """Whether a payload this large takes the pipelined path."""
    return nbytes >= 2 * PIECE_BYTES


def _pieces(body: memoryview) -> list[memoryview]:
    return [body[off : off + PIECE_BYTES] for off in range(0, len(body), PIECE_BYTES)]


def _submit(pool: Executor, fn: Callable[[], int]) -> Future[int]:
    """``pool.submit(fn)``, or ``fn`` run here when the pool is shut down (a tier closing)."""
    try:
        return pool.submit(fn)
    except RuntimeError:
        f: Future[int] = Future()
        try:
            f.set_result(fn())
        except OSError as e:
            f.set_exception(e)
        return f


def pipelined_read(pool: Executor, fd: int, body: memoryview) -> tuple[int, int]:
    """Read ``body`` (from ``HEADER_BYTES``) piece by piece on one pool thread, in file order,
    while this thread hashes each piece as it lands: ``(xxh3 of body, bytes read)``.

    One reader in file order keeps the kernel's sequential readahead working on a cold file
    (pieces read in parallel looked like random I/O and lost up to half the speed on a small
    VM). A short count means the file is truncated; the checksum is then meaningless.
    """
    pieces = _pieces(body)
    landed: queue.SimpleQueue[int] = queue.SimpleQueue()

    def reader() -> int:
        total = 0
        try:
            for i, p in enumerate(pieces):
                n = pio_full(fd, p, HEADER_BYTES + i * PIECE_BYTES, write=False)
                total += n
                landed.put(n)
                if n < len(p):
                    break
        finally:
            landed.put(-1)  # wakes the hasher after the last piece, an early stop or an error
        return total

    fut = _submit(pool, reader)
    hasher = new_hasher()
    try:
        for p in pieces:
            if landed.get() != len(p):
                break
            hasher.update(p)
    finally:
        moved = fut.result()  # waits for the reader; re-raises its OSError
    return hasher.intdigest(), moved


def pipelined_write(pool: Executor, fd: int, body: memoryview) -> int:
    """Write ``body`` (at ``HEADER_BYTES``) in pieces on the pool's threads while this thread
    hashes it; the xxh3 of ``body``. Re-raises a piece's ``OSError`` after all have finished."""
    pieces = _pieces(body)
    futs = [
        _submit(pool, functools.partial(pio_full, fd, p, HEADER_BYTES + i * PIECE_BYTES, write=True))
        for i, p in enumerate(pieces)
    ]
    hasher = new_hasher()
    try:
        for p in pieces:
            hasher.update(p)
        for f in futs:
            f.result()
    finally:
        wait(futs)
    return hasher.intdigest()


def pio_full(fd: int, buf: memoryview, offset: int, *, write: bool) -> int:
    """pwrite/pread all of ``buf`` at ``offset`` (a read stops early at end of file); the count."""
    done = 0
    while done < len(buf):
        n = os.pwrite(fd, buf[done:], offset + done) if write else os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            if write:
                raise OSError(errno.ENOSPC, "write made no progress")
            break
        done += n
    return done


def write_all(fd: int, bufs: list[Buffer]) -> None:
    """``writev`` all of ``bufs`` at the current position."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views)
        if n == 0:
            raise OSError(errno.ENOSPC, "write made no progress")
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def read_all(fd: int, bufs: list[Buffer]) -> int:
    """Fill ``bufs`` from offset 0 until they are full or the file ends; the bytes read."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    total = 0
    while views:
        n = os.preadv(fd, views, total)
        if n == 0:
            break
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
