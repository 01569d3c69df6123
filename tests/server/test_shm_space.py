"""A ``/dev/shm`` smaller than the pool: a clear start-up error, and clients never SIGBUS.

Issue 22 (3): with Docker's 64 MiB ``/dev/shm`` and ``--cpu-size 256MiB`` the daemon started
"ready" and the first client store died of SIGBUS (in vLLM, the worker). Needs a small tmpfs
of its own: mounted here when the test runs as root with the right to mount, else skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.wire.shm import HEADER_BYTES, SegmentError, SharedSegment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a stand-in for a container's small ``/dev/shm``."""
    d = tmp_path / "shm"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_daemon_refuses_a_pool_larger_than_its_shm_with_one_line(small_shm: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtier.cli",
            "server",
            "--cpu-size",
            "64MiB",
            "--port",
            "0",
            "--http-port",
            "0",
            "--shm-dir",
            str(small_shm),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0, "the daemon started with a pool its shared memory cannot hold"
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "8.0 MiB free" in err and "64.0 MiB" in err and "--shm-size" in err, err
    assert not list(small_shm.glob("kvtier-pool-*")), "a refused segment was left behind"


def test_segment_creation_checks_space(small_shm: Path) -> None:
    with pytest.raises(SegmentError, match="--shm-size"):
        SharedSegment.create(small_shm, 16 << 20)
    seg = SharedSegment.create(small_shm, 4 << 20)  # fits: every page is allocated at once
    assert os.stat(seg.path).st_blocks * 512 >= HEADER_BYTES + (4 << 20)
    seg.close()


CLIENT = """
import sys
sys.path.insert(0, {root!r})
from kvtier.wire.shm import SegmentError, SharedSegment
try:
    seg = SharedSegment.attach({path!r}, {arena}, b"n" * 16)
except SegmentError as e:
    print("refused:", e)
    sys.exit(0)
seg.arena.fill_(1)  # what a client's store does; a page the tmpfs cannot give is a SIGBUS
print("wrote")
"""


def test_client_refuses_a_segment_whose_pages_do_not_exist(small_shm: Path) -> None:
    """A sparse segment larger than its tmpfs (what a daemon without the check made): the
    client must refuse to map it (and use the socket), not die when it writes."""
    arena = 32 << 20
    path = small_shm / "kvtier-pool-1-00000000000000aa"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, HEADER_BYTES + arena)
    os.pwrite(fd, b"KVTSHM01" + b"n" * 16 + (1).to_bytes(8, "little"), 0)
    os.close(fd)
    code = CLIENT.format(root=str(ROOT / "src"), path=str(path), arena=arena)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"client died with {r.returncode} (-7 is SIGBUS): {r.stderr[-500:]}"
    assert r.stdout.startswith("refused:") and "allocated" in r.stdout, r.stdout
