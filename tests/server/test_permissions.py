"""Other local users cannot read cached KV: private disk files, a daemon token by default.

Issue 22 (14): disk chunk files were created 0644 in 0755 folders, and a loopback daemon took
any local connection without a token (KV reveals the prompts it was computed from). The second
user here is ``nobody``: a child started as root imports everything, then ``os.setuid``s.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tests.server.conftest import hello, raw_connect
from tests.server.test_http import NS, _get, _post

from kvtier.chunk import Chunk
from kvtier.server.process import DaemonProcess
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.remote import RemoteTier
from kvtier.wire import protocol as P
from kvtier.wire.token_file import default_token_path

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become a second user")


def _as_nobody(code: str) -> dict[str, object]:
    """Run ``code`` (after ``PRELUDE``) as uid ``nobody``; it prints one JSON object."""
    prelude = f"import json, os, sys\nsys.path[:0] = [{str(ROOT / 'src')!r}, {str(ROOT)!r}]\n"
    r = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@needs_root
def test_disk_chunk_files_and_folders_are_private() -> None:
    parent = Path(tempfile.mkdtemp(prefix="kvtier-perm-"))
    parent.chmod(0o755)  # reachable by anyone: only kvtier's own modes protect the chunks
    try:
        tier = DiskTier(parent / "cache", 16 << 20, durability="none")
        key = bytes(range(16))
        assert tier.put(key, Chunk(torch.ones(2, 2, 4, 1, 8), b"f" * 16, 4))
        tier.close()
        root = parent / "cache"
        files = list(root.glob("*/*.kvc"))
        assert len(files) == 1
        assert _mode(files[0]) == 0o600 and _mode(root / "LOCK") == 0o600
        assert _mode(files[0].parent) == 0o700 and _mode(root / "tmp") == 0o700 and _mode(root) == 0o700
        got = _as_nobody(f"""
os.setuid({NOBODY})
out = {{}}
for what, fn in (("read", lambda: open({str(files[0])!r}, "rb").read()),
                 ("list", lambda: os.listdir({str(files[0].parent)!r}))):
    try:
        fn()
        out[what] = "allowed"
    except PermissionError:
        out[what] = "denied"
print(json.dumps(out))
""")
        assert got == {"read": "denied", "list": "denied"}
    finally:
        subprocess.run(["rm", "-rf", str(parent)], check=False)


def test_daemon_makes_a_private_token_and_refuses_clients_without_it(daemon: DaemonProcess) -> None:
    path = default_token_path(daemon.port)
    assert daemon.info["token_file"] == str(path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    s = raw_connect(daemon.port)
    r = hello(s, token="")
    assert isinstance(r, P.Error) and r.code == "auth", r
    s.close()
    tier = RemoteTier(daemon.url, timeout_s=10.0)  # same user: finds the token by the port
    assert tier.put(b"t" * 16, Chunk(torch.ones(2, 2, 4, 1, 8), b"f" * 16, 4))
    assert tier.prefix_contains([b"t" * 16]) == 1 and tier.stats().errors == 0
    tier.close()
    assert _post(daemon.http_url + "/lookup", {"tokens": [1], **NS})[0] == 401  # which prompts: guarded
    assert _get(daemon.http_url + "/stats")[0] == 200  # counters only, like /metrics


@needs_root
def test_another_user_on_the_host_is_refused(daemon: DaemonProcess) -> None:
    got = _as_nobody(f"""
import torch
from kvtier.chunk import Chunk
from kvtier.tiers.remote import RemoteTier
from kvtier.wire.token_file import default_token_path, read_token_file
chunk = Chunk(torch.ones(2, 2, 4, 1, 8), b"f" * 16, 4)
warm = RemoteTier({daemon.url!r}, timeout_s=10.0)  # as root: proves the path works, loads every module
root_put = warm.put(b"r" * 16, chunk)
warm.close()
os.setuid({NOBODY})
tier = RemoteTier({daemon.url!r}, timeout_s=10.0)
out = {{"root_put": root_put, "token": read_token_file(default_token_path({daemon.port})),
        "put": tier.put(b"n" * 16, chunk), "prefix": tier.prefix_contains([b"r" * 16]),
        "errors": tier.stats().errors}}
print(json.dumps(out))
""")
    assert got["root_put"] is True
    assert got["token"] == ""  # cannot read the daemon's token file
    assert got["put"] is False and got["prefix"] == 0 and int(str(got["errors"])) >= 1


def test_a_gracefully_stopped_daemon_removes_its_token_file() -> None:
    with DaemonProcess("--cpu-size", "4MiB") as d:
        path = Path(d.info["token_file"])
        assert path.exists()
    assert not path.exists()
