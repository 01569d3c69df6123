"""DiskTier beyond the conformance suite: restart, corruption, soft failures, eviction, locking."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.serde import HEADER_BYTES
from kvtier.tiers import disk_io
from kvtier.tiers.base import TierError
from kvtier.tiers.disk import DiskTier

SHAPE = (2, 2, 16, 2, 8)  # layers, k/v, tokens, heads, dim
FILE_BYTES = HEADER_BYTES + 2 * 2 * 16 * 2 * 8 * 2  # bf16


@pytest.fixture(params=["one-syscall", "pipelined"])
def io_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both I/O paths: tiny pieces force the pipelined one on these small chunks."""
    if request.param == "pipelined":
        monkeypatch.setattr(disk_io, "PIECE_BYTES", 256)
    return str(request.param)


def _chunk(seed: int) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    return Chunk(torch.randn(SHAPE, generator=g).to(torch.bfloat16), seed.to_bytes(8, "little"), SHAPE[2])


def _key(i: int) -> bytes:
    return bytes([i % 256]) + i.to_bytes(15, "big")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("??/*.kvc"))


def _blocks(root: Path, n: int) -> int:
    """``n`` filesystem blocks: a small chunk file, or a folder, takes one."""
    return n * os.statvfs(root).f_frsize


def test_restart_finds_everything_bit_identical(tmp_path: Path, io_mode: str) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        for i in range(5):
            assert t.put(_key(i), _chunk(i))
        used = t.stats().bytes_used
    with DiskTier(tmp_path, 1 << 20) as t2:
        s = t2.stats()
        assert s.chunks == 5 and s.bytes_used == used == _blocks(tmp_path, 2 + 5 + 5)  # folders, files
        for i in range(5):
            got = t2.get(_key(i))
            assert got is not None and _same(got.kv, _chunk(i).kv)
            assert got.fingerprint == _chunk(i).fingerprint and got.num_tokens == 16


def test_restart_keeps_age_order_and_shrinks_to_capacity(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        for i in range(4):
            t.put(_key(i), _chunk(i))
    for i in range(4):  # mtime is the age the rebuilt LRU uses; make it unambiguous
        os.utime(tmp_path / f"{i:02x}" / f"{_key(i).hex()}.kvc", ns=(10**18 + i * 10**9,) * 2)
    with DiskTier(tmp_path, _blocks(tmp_path, 2 + 4 + 2)) as t2:  # root+tmp, 4 fan-out folders, 2 files
        assert [t2.contains(_key(i)) for i in range(4)] == [False, False, True, True]
        assert len(_files(tmp_path)) == 2  # evicted files are deleted


def test_start_cleans_temp_files_and_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(_key(1), _chunk(1))
        t.put(_key(2), _chunk(2))
    (tmp_path / "tmp" / "deadbeef.1.2.tmp").write_bytes(b"half a chunk")
    (tmp_path / "00").mkdir()
    (tmp_path / "07").mkdir()
    (tmp_path / "00" / "not-hex.kvc").write_bytes(b"x")
    good = tmp_path / "02" / f"{_key(2).hex()}.kvc"
    shutil.copy(good, tmp_path / "07" / f"{_key(7).hex()}.kvc")  # a valid file under the wrong key
    with caplog.at_level(logging.WARNING), DiskTier(tmp_path, 1 << 20) as t2:
        assert t2.stats().chunks == 2 and not t2.contains(_key(7))
    assert not list((tmp_path / "tmp").iterdir())
    assert len(_files(tmp_path)) == 2
    assert "removing unreadable chunk file" in caplog.text


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip-header":
        data[40] ^= 0x10
    elif how == "flip-payload":
        data[HEADER_BYTES + 777] ^= 0x01
    elif how == "flip-last":
        data[-1] ^= 0x80
    elif how == "truncate":
        data = data[:-100]
    elif how == "extend":
        data += b"\0"
    elif how == "empty":
        data = bytearray()
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["flip-header", "flip-payload", "flip-last", "truncate", "extend", "empty", "delete"]
)
def test_damaged_file_is_a_miss_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, io_mode: str
) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(_key(3), _chunk(3))
        t.put(_key(4), _chunk(4))
        _damage(tmp_path / "03" / f"{_key(3).hex()}.kvc", how)
        with caplog.at_level(logging.WARNING):
            assert t.get(_key(3)) is None  # never an exception, never wrong tensors
        assert "treated as a miss" in caplog.text
        assert not t.contains(_key(3)) and t.stats().errors == 1
        assert not (tmp_path / "03" / f"{_key(3).hex()}.kvc").exists()  # corrupt files are deleted
        ok = t.get(_key(4))
        assert ok is not None and _same(ok.kv, _chunk(4).kv)
        assert t.put(_key(3), _chunk(3))  # and it can be stored again
        again = t.get(_key(3))
        assert again is not None and _same(again.kv, _chunk(3).kv)


def test_file_swapped_for_another_valid_chunk_is_a_miss(tmp_path: Path, io_mode: str) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(_key(1), _chunk(1))
        t.put(_key(2), _chunk(2))
        p1 = tmp_path / "01" / f"{_key(1).hex()}.kvc"
        shutil.copy(tmp_path / "02" / f"{_key(2).hex()}.kvc", p1)
        assert t.get(_key(1)) is None


def test_disk_full_fails_soft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, io_mode: str) -> None:
    real_writev, real_pwrite = os.writev, os.pwrite
    with DiskTier(tmp_path, 1 << 20) as t:
        assert t.put(_key(1), _chunk(1))
        used = t.stats().bytes_used

        def full(fd: int, bufs: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "writev", full)
        monkeypatch.setattr(os, "pwrite", lambda fd, data, off: full(fd, data))
        assert t.put(_key(2), _chunk(2)) is False
        s = t.stats()
        assert s.put_failures == 1 and s.errors == 1 and s.chunks == 1
        assert s.bytes_used == used + _blocks(tmp_path, 1)  # folder 02 was made: it stays, charged
        assert not list((tmp_path / "tmp").iterdir())  # the partial temp file is gone
        got = t.get(_key(1))
        assert got is not None and _same(got.kv, _chunk(1).kv)
        monkeypatch.setattr(os, "writev", real_writev)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        assert t.put(_key(2), _chunk(2))


def test_permission_denied_fails_soft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def deny(path: object, flags: int, *a: object, **k: object) -> int:
        if flags & os.O_WRONLY or str(path).endswith(".kvc"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)  # type: ignore[arg-type]

    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(_key(1), _chunk(1))
        monkeypatch.setattr(os, "open", deny)
        assert t.put(_key(2), _chunk(2)) is False
        assert t.get(_key(1)) is None
        assert t.stats().put_failures == 1


def test_unwritable_directory_at_run_time(tmp_path: Path) -> None:
    """Root ignores chmod, so make the temp dir a *file*: every create under it fails (ENOTDIR)."""
    with DiskTier(tmp_path, 1 << 20) as t:
        shutil.rmtree(tmp_path / "tmp")
        (tmp_path / "tmp").write_bytes(b"")
        assert t.put(_key(1), _chunk(1)) is False
        assert t.stats().put_failures == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        os.chmod(tmp_path / "tmp", 0o500)
        try:
            assert t.put(_key(1), _chunk(1)) is False
        finally:
            os.chmod(tmp_path / "tmp", 0o700)


def test_directory_removed_at_run_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    with DiskTier(root, 1 << 20) as t:
        t.put(_key(1), _chunk(1))
        shutil.rmtree(root)
        with caplog.at_level(logging.WARNING):
            assert t.get(_key(1)) is None
            assert t.put(_key(2), _chunk(2)) is False
            assert t.remove(_key(9)) is False
        assert not root.exists()  # never recreated at run time (a vanished mount point)
        assert t.stats().put_failures == 1 and "disk tier" in caplog.text


def test_directory_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(TierError, match="cannot use directory"):
        DiskTier(tmp_path / "f" / "cache", 1 << 20)


def test_one_owner_per_directory(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20), pytest.raises(TierError, match="in use"):
        DiskTier(tmp_path, 1 << 20)
    DiskTier(tmp_path, 1 << 20).close()  # released on close


def test_eviction_deletes_files_in_policy_order(tmp_path: Path) -> None:
    def key(i: int) -> bytes:  # all in fan-out folder 00
        return _key(256 * i)

    cap = _blocks(tmp_path, 2 + 1 + 3)  # root+tmp, folder 00, three one-block files
    with DiskTier(tmp_path, cap) as t:
        for i in range(3):
            t.put(key(i), _chunk(i))
        g = t.get(key(0))  # 0 becomes most recent: 1 is the LRU victim
        assert g is not None
        t.put(key(3), _chunk(3))
        assert [t.contains(key(i)) for i in range(4)] == [True, False, True, True]
        s = t.stats()
        assert s.evictions == 1 and s.evicted_bytes == _blocks(tmp_path, 1) and s.bytes_used == cap
        assert len(_files(tmp_path)) == 3
        assert t.put(key(9), Chunk(torch.zeros(cap, dtype=torch.uint8), b"", 1)) is False


def test_too_small_max_bytes_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TierError, match="max_bytes 4096 is too small: its own folders take"):
        DiskTier(tmp_path, 4096)


@pytest.mark.parametrize("durability", ["always", "flush", "none"])
def test_durability_modes(tmp_path: Path, durability: str) -> None:
    with DiskTier(tmp_path, 1 << 20, durability=durability) as t:
        assert t.put(_key(1), _chunk(1))
        assert t.sync()
    with DiskTier(tmp_path, 1 << 20) as t2:
        got = t2.get(_key(1))
        assert got is not None and _same(got.kv, _chunk(1).kv)


def test_batched_get_in_parallel_keeps_order(tmp_path: Path, io_mode: str) -> None:
    with DiskTier(tmp_path, 1 << 22, io_threads=4) as t:
        assert all(t.batched_put([(_key(i), _chunk(i)) for i in range(12)]))
        keys = [_key(i) for i in (11, 3, 50, 0, 7)]
        got = t.batched_get(keys)
        assert got[2] is None
        for i, c in zip((11, 3, None, 0, 7), got):
            if i is not None:
                assert c is not None and _same(c.kv, _chunk(i).kv)


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(TierError):
        DiskTier(tmp_path, 0)
    with pytest.raises(TierError):
        DiskTier(tmp_path, 1 << 20, durability="sometimes")
    with DiskTier(tmp_path, 1 << 20) as t:
        with pytest.raises(TierError):
            t.put(b"", _chunk(1))
        with pytest.raises(TierError):
            t.put(_key(1), Chunk(torch.zeros(2, dtype=torch.complex64), b"", 1))
    with pytest.raises(TierError):
        t.put(_key(1), _chunk(1))  # closed


def test_get_into_a_preallocated_tensor(tmp_path: Path, io_mode: str) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(_key(1), _chunk(1))
        h = t.header_of(_key(1))
        assert h is not None and h.shape == SHAPE and h.dtype == torch.bfloat16
        out = torch.zeros(SHAPE, dtype=torch.bfloat16)
        got = t.get_into(_key(1), out)
        assert got is not None and got.kv is out and _same(out, _chunk(1).kv)
        with pytest.raises(TierError):
            t.get_into(_key(1), torch.zeros(SHAPE, dtype=torch.float32))
        assert t.get_into(_key(2), out) is None and t.header_of(_key(2)) is None


def test_read_buffers_are_recycled_only_after_release(tmp_path: Path, io_mode: str) -> None:
    with DiskTier(tmp_path, 1 << 22, read_buffer_bytes=4 * FILE_BYTES) as t:
        for i in range(3):
            t.put(_key(i), _chunk(i))
        a = t.get(_key(0))
        b = t.get(_key(1))  # a is still held: b must not share its memory
        assert a is not None and b is not None and a.kv.data_ptr() != b.kv.data_ptr()
        assert _same(a.kv, _chunk(0).kv) and _same(b.kv, _chunk(1).kv)
        ptr = a.kv.data_ptr()
        a.release()
        c = t.get(_key(2))
        assert c is not None and c.kv.data_ptr() == ptr and _same(c.kv, _chunk(2).kv)
        held = [t.get(_key(i % 3)) for i in range(6)]  # more than the pool holds: fresh tensors
        for i, h in enumerate(held):
            assert h is not None and _same(h.kv, _chunk(i % 3).kv)


def test_large_chunk_pipelined_round_trip_and_truncation(tmp_path: Path) -> None:
    """A chunk of several default-size pieces (the real pipelined path, with real piece threads)."""
    kv = torch.randn(4, 2, 256, 8, 128, generator=torch.Generator().manual_seed(5)).to(
        torch.bfloat16
    )  # 4 MiB
    big = Chunk(torch.cat([kv, kv.flip(0), kv * 2], dim=2), b"big", 768)  # 12 MiB: 3 pieces
    assert big.nbytes >= 2 * disk_io.PIECE_BYTES
    with DiskTier(tmp_path, 1 << 26) as t:
        assert t.put(_key(1), big) and t.put(_key(2), big)
        got = t.get(_key(1))
        assert got is not None and _same(got.kv, big.kv)
        got.release()
        path = tmp_path / "02" / f"{_key(2).hex()}.kvc"
        os.truncate(path, path.stat().st_size - disk_io.PIECE_BYTES - 10)  # a whole piece short
        assert t.get(_key(2)) is None
    with DiskTier(tmp_path, 1 << 26) as t2:  # the header written last is read back on restart
        again = t2.get(_key(1))
        assert again is not None and _same(again.kv, big.kv) and again.fingerprint == b"big"


def _du(root: Path) -> int:
    """Bytes allocated under ``root`` (what ``du`` counts): every file's and folder's blocks."""
    total = os.stat(root).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def test_space_used_with_small_chunks_stays_within_max_bytes(tmp_path: Path) -> None:
    """Issue 22 #6: a 256-byte file takes a 4 KiB block and folders take blocks too; counting
    file lengths let small chunks use 6.4x ``max_bytes``. Allocated space must stay under it."""
    cap = 4 << 20
    small = Chunk(torch.arange(64, dtype=torch.float16).reshape(1, 2, 4, 1, 8), b"s", 4)  # 128 B
    root = tmp_path / "c"
    with DiskTier(root, cap) as t:
        for i in range(1500):  # first key bytes cover all 256 fan-out folders
            assert t.put(bytes([i * 37 % 256]) + i.to_bytes(15, "big"), small)
        s = t.stats()
        used = _du(root)
        assert used <= cap, f"{used} bytes on disk for max_bytes {cap}"
        assert used <= s.bytes_used <= cap  # the count never under-states what the disk holds
        assert s.evictions > 0 and s.chunks > 100
    with DiskTier(root, cap) as t2:  # a restart counts the same way
        assert _du(root) <= t2.stats().bytes_used <= cap


def test_fan_out_folders_are_private_made_lazily_and_tightened_on_start(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        assert not (tmp_path / "05").exists()  # made by the first put that needs it
        t.put(_key(5), _chunk(5))
        assert (tmp_path / "05").stat().st_mode & 0o777 == 0o700
    os.chmod(tmp_path / "05", 0o755)  # as an older version made them
    with DiskTier(tmp_path, 1 << 20) as t2:
        assert t2.contains(_key(5)) and (tmp_path / "05").stat().st_mode & 0o777 == 0o700
