"""The local-disk tier: one self-checking file per chunk, committed by rename, verified on read.

Why one file per chunk (temp file + rename) rather than an append-only segment log: chunks are
large (a 256-token Llama-3-8B chunk is 32 MiB), so a file's overhead (an inode, open/close) is
noise next to its data; eviction is one ``unlink`` that returns the space at once, where a log
must compact (rewrite live data, doubling write traffic) to reclaim evicted chunks; and rename
is the filesystem's atomic commit, so there is no separate index to keep consistent: the
directory *is* the index, rebuilt on start from each file's 128-byte header (``serde``).

Layout: ``<path>/<kk>/<key hex>.kvc`` (``kk`` = first key byte; up to 256 fan-out directories,
each made by the first put that needs it, keep each directory small), ``<path>/tmp/`` for writes
in progress (emptied on start), ``<path>/LOCK`` (``flock``: one process owns a directory; a second
gets a ``TierError``).

Space (``max_bytes``) counts what the filesystem allocates, not file lengths: a file is charged
its allocated blocks (``st_blocks * 512``, at least its size rounded up to the filesystem's block
size: a 2 KiB chunk takes 4 KiB, and a header spills a power-of-two payload into one more block),
and every folder (root, ``tmp``, each fan-out folder, re-measured as it grows) is charged its own
blocks. So with any chunk size ``stats().bytes_used`` >= what ``du`` reports and <= ``max_bytes``
(issue 22 #6: counting file bytes let small chunks take 6.4x the limit). A put reserves the
rounded size (plus a block for a folder it creates) before writing and corrects the charge to
the measured one after; folders are never removed, so they are charged for good. The 256 fan-out
folders alone take 1 MiB on a 4 KiB-block filesystem: a tier of a few MiB holds few chunks.

Durability (``durability``):
* ``"flush"`` (default): a put writes the temp file and renames it; ``sync()`` (called by
  ``TierManager.flush``) fsyncs the files renamed since the last sync and their directories.
  A put survives a crash of the process at once (the page cache is the kernel's) and a power
  loss once synced.
* ``"always"``: fsync the file before and its directory after the rename in every put.
* ``"none"``: never fsync (scratch space).
Whatever happens, a file under its final name was complete when renamed; a file damaged anyway
(power loss before a sync, bit rot, someone's ``truncate``) fails its checksum on read and is a
miss, never wrong KV.

Reads: one ``os.preadv`` of the whole file into [a header buffer, the destination tensor's own
memory, one spare byte]: no intermediate copy, and the spare byte catches a file longer than its
header says. The destination is a recycled buffer from a small host pool (``read_buffer_bytes``),
returned to it by ``Chunk.release()``, or the caller's own tensor (``get_into``). Chunks of two
``PIECE_BYTES`` or more are pipelined: one I/O thread reads pieces in file order while the caller
hashes those that landed; a write copies pieces in parallel while the caller hashes, and writes
the header (which holds the checksum) last. The xxh3 hasher releases the GIL, so checksumming
costs little beyond the I/O itself (benchmarks/RESULTS.md). ``batched_get`` runs reads on a thread pool (``io_threads``; ``preadv`` releases the
GIL), so many are in flight; ``TierManager.iter_prefix`` (a retrieve) keeps ``READ_AHEAD``
gets in flight ahead of its consumer, each verified before it is handed out. O_DIRECT is not used: re-reads from the page cache are the common
fast case, and O_DIRECT needs aligned buffers and fails on tmpfs.

Privacy: chunk files are created 0600 and the fan-out and ``tmp`` folders 0700 (a new root too):
KV reveals the prompts it was computed from, so other local users must not read it.

Soft failures: disk full, permission denied, a directory removed at run time make ``put`` return
``False`` (``put_failures``/``errors``) and ``get`` return ``None`` with a (rate-limited) warning;
``OSError`` never reaches the caller. The root directory is created only at start, never again:
if a mount vanishes at run time, recreating its mount point would fill the parent filesystem.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.chunk import Chunk
from kvtier.memory import HostBufferPool, should_pin
from kvtier.policies import make_policy
from kvtier.serde import HEADER_BYTES, ChunkHeader, CorruptChunkError, SerdeError, encode_parts
from kvtier.serde.base import (
    check_key,
    decode_payload,
    empty_for,
    make_header,
    payload_checksum,
    raw_payload,
    tensor_bytes,
)
from kvtier.serde.codec import RAW, Buffer, CodecError
from kvtier.tiers import disk_io
from kvtier.tiers.base import Tier, TierClosedError, TierError, TierStats

log = logging.getLogger(__name__)

DURABILITY = ("flush", "always", "none")
SUFFIX = ".kvc"
_WARN_EVERY_S = 1.0


@dataclass
class _Entry:
    header: ChunkHeader
    header_bytes: bytes
    nbytes: int  # file size = HEADER_BYTES + payload
    charge: int  # space the file takes on disk (allocated blocks), what counts against max_bytes


class DiskTier(Tier):
    """Chunks as files under ``path``, at most ``max_bytes`` of them, evicted by ``policy``."""

    name = "disk"

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_bytes: int,
        *,
        policy: str = "lru",
        durability: str = "flush",
        io_threads: int = 4,
        codec: str = "raw",
        read_buffer_bytes: int = 256 * 1024**2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise TierError(f"disk tier: max_bytes must be > 0, got {max_bytes}")
        if durability not in DURABILITY:
            raise TierError(f"disk tier: durability must be one of {DURABILITY}, got {durability!r}")
        if io_threads < 1:
            raise TierError(f"disk tier: io_threads must be >= 1, got {io_threads}")
        self.root = Path(path)
        self.capacity = max_bytes
        self.durability = durability
        self.codec = codec
        self.policy = make_policy(policy, clock=clock)
        self._lock = threading.RLock()
        self._entries: dict[bytes, _Entry] = {}
        self._writing: set[bytes] = set()
        self._unsynced: set[Path] = set()
        self._used = 0  # bytes charged: folders (self._fixed) + every file's charge, reserved or written
        self._fixed = 0  # folders' charge: evicting files never frees it
        self._folders: dict[str, int] = {}  # fan-out folder name -> its charge
        self._stats = TierStats(self.name, capacity_bytes=max_bytes)
        self._last_warn: dict[str, float] = {}
        self._closed = False
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._tmp = self.root / "tmp"
            _private_dir(self._tmp)  # fan-out folders are made as needed (_reserve), 0700 too
            self._lock_fd = self._take_lock()
            self.block_bytes = os.statvfs(self.root).f_frsize or 4096
            self._fixed = self._folder_charge(self.root) + self._folder_charge(self._tmp)
        except OSError as e:
            raise TierError(f"disk tier: cannot use directory {self.root}: {e.strerror or e}") from e
        if max_bytes < self._fixed + 2 * self.block_bytes:
            os.close(self._lock_fd)
            raise TierError(
                f"disk tier: max_bytes {max_bytes} is too small: its own folders take {self._fixed} "
                f"bytes on this filesystem; give it at least {self._fixed + 2 * self.block_bytes}"
            )
        self._used = self._fixed
        self._rebuild()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvtier-disk")
        self._piece_pool = ThreadPoolExecutor(max(2, io_threads), thread_name_prefix="kvtier-disk-io")
        # recycled read buffers: a fresh 32 MiB tensor per get costs ~8k page faults, often more
        # than the read itself; pinned where CUDA is present, so a host->GPU copy runs at full speed
        self._buffers = (
            HostBufferPool(read_buffer_bytes, pin=should_pin("auto")) if read_buffer_bytes > 0 else None
        )

    @property
    def read_buffers(self) -> HostBufferPool | None:
        """The recycled read-buffer pool (``None`` when ``read_buffer_bytes`` is 0); its
        ``failed_allocations`` counts gets that had to read into a fresh tensor instead."""
        return self._buffers

    # -- start-up -------------------------------------------------------------------------------
    def _take_lock(self) -> int:
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TierError(f"disk tier: {self.root} is in use by another DiskTier (LOCK is held)") from None
        return fd

    def _rebuild(self) -> None:
        """Index every valid file on disk (oldest first, so LRU order survives a restart)."""
        for f in self._tmp.iterdir():  # writes that a crash interrupted: never committed
            f.unlink(missing_ok=True)
        found: list[tuple[int, bytes, _Entry]] = []
        for i in range(256):
            folder = self.root / f"{i:02x}"
            if not folder.is_dir():
                continue
            try:
                _private_dir(folder)  # one made by an older, 0755 version is tightened
            except OSError as e:
                raise TierError(f"disk tier: cannot make {folder} private: {e.strerror or e}") from e
            with os.scandir(folder) as it:
                for de in it:
                    item = self._scan(de)
                    if item is not None:
                        found.append(item)
            self._folders[folder.name] = self._folder_charge(folder)
        self._fixed += sum(self._folders.values())
        self._used = self._fixed
        found.sort(key=lambda x: x[0])
        for _, key, entry in found:
            self._entries[key] = entry
            self.policy.insert(key, entry.charge)
            self._used += entry.charge
        self._make_room(0)  # the capacity may have shrunk since the files were written
        if found:
            log.info("disk tier: found %d chunks (%d bytes) in %s", len(found), self._used, self.root)

    def _scan(self, de: os.DirEntry[str]) -> tuple[int, bytes, _Entry] | None:
        if not de.name.endswith(SUFFIX):
            return None
        try:
            key = bytes.fromhex(de.name[: -len(SUFFIX)])
            with open(de.path, "rb") as f:
                hb = f.read(HEADER_BYTES)
                st = os.fstat(f.fileno())
            h = ChunkHeader.unpack(hb)
            check_key(h, key)
            if st.st_size != h.total_nbytes:
                raise CorruptChunkError(f"file is {st.st_size} bytes, header says {h.total_nbytes}")
        except (ValueError, OSError) as e:  # ValueError: bad hex name or CorruptChunkError
            log.warning("disk tier: removing unreadable chunk file %s (%s)", de.path, e)
            with contextlib.suppress(OSError):  # best effort; it will be retried on the next start
                os.unlink(de.path)
            return None
        return st.st_mtime_ns, key, _Entry(h, hb, st.st_size, self._file_charge(st.st_size, st.st_blocks))

    # -- Tier API ---------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> Chunk | None:
        """The chunk, read into a recycled buffer when one is free (``release()`` recycles it)."""
        h, buffers = self.header_of(key), self._buffers
        obj = None
        if h is not None and h.codec_id == RAW.id and buffers is not None:
            obj = buffers.allocate(h.shape, h.dtype)
        if obj is None or buffers is None:
            return self.get_into(key, None)
        try:
            c = self.get_into(key, obj.tensor)
        except TierError:  # the entry changed shape under us (re-put); read into a fresh tensor
            buffers.release(obj)
            return self.get_into(key, None)
        if c is None:
            buffers.release(obj)
            return None
        c._on_release = lambda: buffers.release(obj)
        return c

    def get_into(self, key: bytes, out: torch.Tensor | None) -> Chunk | None:
        """``get``, reading the KV straight into ``out`` (e.g. a host-pool object) when given.

        ``out`` must be a contiguous CPU tensor of the stored shape and dtype (see
        ``header_of``); otherwise ``TierError``. On a miss ``out`` may hold partial data.
        """
        with self._lock:
            e = self._entries.get(key)
            if e is None or self._closed:
                self._stats.misses += 1
                return None
            self.policy.access(key)
        if out is not None and (
            tuple(out.shape) != e.header.shape
            or out.dtype != e.header.dtype
            or not out.is_contiguous()
            or out.device.type != "cpu"
        ):
            raise TierError(
                f"out is {tuple(out.shape)} {out.dtype}, chunk is {e.header.shape} {e.header.dtype}"
            )
        try:
            kv = self._read(self._path(key), e, out)
        except (OSError, CorruptChunkError) as err:
            self._drop(key, e, err)
            return None
        with self._lock:
            self._stats.hits += 1
        return Chunk(kv, e.header.fingerprint, e.header.num_tokens)

    def put(self, key: bytes, chunk: Chunk) -> bool:
        _check_key(key)
        if self._closed:
            raise TierClosedError("disk tier is closed")
        header: bytes | None = None  # raw: made while writing, once the payload is hashed
        try:
            if self.codec == RAW.name:
                payload: Buffer = raw_payload(chunk, key)
            else:
                header, payload = encode_parts(chunk, self.codec, key)
        except (SerdeError, CodecError) as e:
            raise TierError(f"disk tier: cannot store this chunk: {e}") from e
        size = HEADER_BYTES + len(payload)
        reserved = self._file_charge(size, 0)
        final = self._path(key)
        with self._lock:
            if key in self._entries:
                self.policy.access(key)
                return True
            if key in self._writing:
                return True
            try:
                if not self._reserve(final.parent, reserved):
                    self._stats.put_failures += 1
                    return False
            except OSError as err:  # the fan-out folder cannot be made (root gone, read-only, full)
                self._stats.put_failures += 1
                self._stats.errors += 1
                self._warn("put", f"cannot make folder {final.parent}: {err}")
                return False
            self._writing.add(key)
        try:
            header, allocated = self._write_file(key, final, chunk, header, payload)
            folder_now = self._folder_charge(final.parent)  # a folder grows with its entries
        except OSError as err:
            with self._lock:
                self._used -= reserved
                self._writing.discard(key)
                self._stats.put_failures += 1
                self._stats.errors += 1
            self._warn("put", f"cannot write chunk {key.hex()} under {self.root}: {err}")
            return False
        with self._lock:
            self._writing.discard(key)
            charge = self._file_charge(size, allocated)
            grown = max(0, folder_now - self._folders[final.parent.name])
            self._folders[final.parent.name] += grown
            self._fixed += grown
            self._used += charge - reserved + grown
            self._entries[key] = _Entry(ChunkHeader.unpack(header), header, size, charge)
            self.policy.insert(key, charge)
            self._stats.puts += 1
            if self.durability == "flush":
                self._unsynced.add(final)
            if self._used > self.capacity:  # measured more than reserved: evict back under the limit
                self._make_room(0)
        return True

    def remove(self, key: bytes) -> bool:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is None:
                return False
            self._forget(key, e)
            return True

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        if len(keys) <= 1 or self._closed:
            return [self.get(k) for k in keys]
        return list(self._pool.map(self.get, keys))

    def batched_put(self, items: Iterable[tuple[bytes, Chunk]]) -> list[bool]:
        items = list(items)
        if len(items) <= 1 or self._closed:
            return [self.put(k, c) for k, c in items]
        return list(self._pool.map(lambda kc: self.put(*kc), items))

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**vars(self._stats))
            s.chunks = len(self._entries)
            s.bytes_used = self._used
            return s

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def sync(self) -> bool:
        """Make every put so far durable (fsync files, then their directories); ``False`` on error."""
        with self._lock:
            files, self._unsynced = self._unsynced, set()
        ok = True
        for path in sorted(files):
            try:
                disk_io.fsync_path(path)
            except FileNotFoundError:
                continue  # evicted or removed since: nothing to make durable
            except OSError as err:
                ok = False
                with self._lock:
                    self._stats.errors += 1
                self._warn("sync", f"fsync of {path} failed: {err}")
        for d in sorted({p.parent for p in files}):
            try:
                disk_io.fsync_path(d)
            except OSError as err:
                ok = False
                self._warn("sync", f"fsync of directory {d} failed: {err}")
        return ok

    def close(self) -> None:
        """Sync, stop the I/O threads and release the directory; the files stay (persistence)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._piece_pool.shutdown(wait=True)
        if self.durability == "flush":
            self.sync()
        os.close(self._lock_fd)

    # -- internals --------------------------------------------------------------------------------
    def _path(self, key: bytes) -> Path:
        return self.root / f"{key[0]:02x}" / f"{key.hex()}{SUFFIX}"

    def _file_charge(self, size: int, allocated_blocks: int) -> int:
        """Space a file of ``size`` bytes with ``allocated_blocks`` 512-byte blocks takes: the
        measured allocation, but never less than the size rounded up to whole fs blocks (delayed
        allocation or inline data can report fewer blocks than the file will take)."""
        bs = self.block_bytes
        return max(allocated_blocks * 512, -(-size // bs) * bs)

    def _folder_charge(self, folder: Path) -> int:
        """A folder's allocated space, at least one block (tmpfs reports none; it still costs)."""
        return max(os.stat(folder).st_blocks * 512, self.block_bytes)

    def _reserve(self, folder: Path, reserved: int) -> bool:
        """Make room for a file of charge ``reserved`` in ``folder`` and charge it, first making
        (and charging) the folder if this is its first file; ``False`` if it cannot fit.
        OSError when the folder cannot be made. The caller holds the lock."""
        new = folder.name not in self._folders
        if not self._make_room(reserved + (self.block_bytes if new else 0)):
            return False
        if new:
            with contextlib.suppress(FileExistsError):  # made by hand since the start: adopt it
                os.mkdir(folder, 0o700)  # never parents=True: a vanished root stays vanished
            charge = self._folder_charge(folder)
            self._folders[folder.name] = charge
            self._fixed += charge
            self._used += charge
        self._used += reserved
        return True

    def _make_room(self, size: int) -> bool:
        """Evict until ``size`` more bytes fit; ``False`` if they cannot (caller holds the lock)."""
        if self._fixed + size > self.capacity:
            return False
        while self._used + size > self.capacity:
            victim = self.policy.victim()
            if victim is None:
                return False  # the rest is reserved by writes in flight
            e = self._entries.pop(victim)  # type: ignore[call-overload]
            self._forget(victim, e)  # type: ignore[arg-type]
            self._stats.evictions += 1
            self._stats.evicted_bytes += e.charge
        return True

    def _forget(self, key: bytes, e: _Entry) -> None:
        """Drop an entry already popped from the index, and its file (caller holds the lock).

        The unlink happens under the lock so it can never race with a new put of the same key
        renaming a fresh file into place. A reader that already opened the file keeps reading it.
        """
        self.policy.remove(key)
        self._used -= e.charge
        path = self._path(key)
        self._unsynced.discard(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # already gone (removed by hand, or the directory vanished): the goal is reached
        except OSError as err:
            self._stats.errors += 1
            self._warn("unlink", f"cannot remove {path}: {err}")

    def _write_file(
        self, key: bytes, final: Path, chunk: Chunk, header: bytes | None, payload: Buffer
    ) -> tuple[bytes, int]:
        """Write temp file, rename to ``final``; returns the header written and the file's
        allocated 512-byte blocks (``st_blocks``; includes delayed allocations on ext4/xfs).

        ``header`` is ``None`` for the raw codec: the payload is written in pieces while this
        thread hashes it, then the header (which holds the checksum) goes to offset 0.
        """
        tmp = self._tmp / f"{key.hex()}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                if header is None and not disk_io.pipelined(len(payload)):  # small: one writev
                    header = make_header(
                        chunk, key, RAW.id, len(payload), len(payload), payload_checksum(payload)
                    )
                if header is None:
                    checksum = disk_io.pipelined_write(self._piece_pool, fd, memoryview(payload).cast("B"))
                    header = make_header(chunk, key, RAW.id, len(payload), len(payload), checksum)
                    disk_io.pio_full(fd, memoryview(header), 0, write=True)
                else:
                    disk_io.write_all(fd, [header, payload])
                if self.durability == "always":
                    os.fsync(fd)
                blocks = os.fstat(fd).st_blocks
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except OSError:
            with contextlib.suppress(OSError):  # cleanup of a failed write; the error is re-raised
                os.unlink(tmp)
            raise
        if self.durability == "always":
            disk_io.fsync_path(final.parent)
        return header, blocks

    def header_of(self, key: bytes) -> ChunkHeader | None:
        """The stored chunk's header (shape, dtype, sizes) without reading it, or ``None``."""
        e = self._entries.get(key)
        return e.header if e is not None else None

    def _read(self, path: Path, e: _Entry, out: torch.Tensor | None = None) -> torch.Tensor:
        h = e.header
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = bytearray(HEADER_BYTES)
            checksum = None
            if h.codec_id == RAW.id:  # straight into the destination: no intermediate buffer
                out = empty_for(h) if out is None else out
                body = tensor_bytes(out)
            else:
                body = memoryview(bytearray(h.payload_nbytes))
            if disk_io.pipelined(len(body)):
                n = disk_io.pio_full(fd, memoryview(head), 0, write=False)
                checksum, moved = disk_io.pipelined_read(self._piece_pool, fd, body)
                n += moved + len(os.pread(fd, 1, HEADER_BYTES + len(body)))  # a longer file is corrupt
            else:
                n = disk_io.read_all(fd, [head, body, bytearray(1)])
        finally:
            os.close(fd)
        if n != h.total_nbytes:
            raise CorruptChunkError(f"read {n} bytes, expected {h.total_nbytes} (truncated or extended)")
        if head != e.header_bytes:
            raise CorruptChunkError("header on disk differs from the one indexed")
        return decode_payload(h, body, out, checksum=checksum)

    def _drop(self, key: bytes, e: _Entry, err: BaseException) -> None:
        """A read failed: a miss; forget the chunk (and delete its file if it is corrupt)."""
        with self._lock:
            self._stats.misses += 1
            if self._entries.get(key) is not e:  # evicted/removed while we read: a benign race
                return
            del self._entries[key]
            self._stats.errors += 1
            self._forget(key, e)
        what = "corrupt" if isinstance(err, CorruptChunkError) else "unreadable"
        self._warn("get", f"chunk {key.hex()} is {what} ({err}); treated as a miss")

    def _warn(self, op: str, msg: str) -> None:
        """Log at WARNING at most once a second per operation (a full disk fails every put)."""
        now = time.monotonic()
        if now - self._last_warn.get(op, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._last_warn[op] = now
            log.warning("disk tier: %s", msg)
        else:
            log.debug("disk tier: %s", msg)


def _private_dir(d: Path) -> None:
    """``d`` exists and only its owner may list or enter it (one made by an older, 0755 version
    is tightened: KV reveals the prompts it came from)."""
    d.mkdir(mode=0o700, exist_ok=True)
    if d.stat().st_mode & 0o077:
        d.chmod(0o700)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not 1 <= len(key) <= 32:
        raise TierError(f"disk tier: keys must be 1..32 bytes, got {key!r}")
