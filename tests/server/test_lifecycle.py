"""Lifecycle with real processes: an engine killed mid-flight, daemon restarts (clean and crash),
reaping of a dead or stuck client's state, graceful SIGTERM, restart recovery from the disk tier."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess
from kvtier.tiers.factory import build_tiers

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
from kvtier import CacheEngine, Config
from tests.conftest import make_kv, make_tokens
cfg = Config.load(env={{}}, cpu__enabled=False, remote__url={url!r}, chunk_tokens=16, model__model_id="life")
eng = CacheEngine(cfg)
tokens = make_tokens({n}, seed={seed})
print("stored", eng.store(tokens, make_kv({n}, seed={seed})), flush=True)
tier = eng.storage.tiers[0]
held = tier.get(eng.keys(tokens)[0].digest)  # a lease this process never gives back
print("holding", held is not None, tier.shm, flush=True)
time.sleep(600)
"""


def _engine(url: str) -> CacheEngine:
    cfg = Config.load(env={}, cpu__enabled=False, remote__url=url, chunk_tokens=16, model__model_id="life")
    eng = CacheEngine(cfg)
    eng.bind_model(4, 2, 16, torch.float32)
    return eng


def _stats(d: DaemonProcess) -> dict[str, Any]:
    with urllib.request.urlopen(d.http_url + "/stats", timeout=10) as r:
        return dict(json.loads(r.read())["server"])


def _wait(cond: Any, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_engine_killed_then_another_engine_gets_identical_chunks(daemon: DaemonProcess) -> None:
    n, seed = 200, 11
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), url=daemon.url, n=n, seed=seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["stored", str(n)]
        assert child.stdout.readline().split() == ["holding", "True", "True"]
        before = _stats(daemon)
        assert before["leases_held"] >= 1
        os.kill(child.pid, signal.SIGKILL)  # engine A crashes holding a lease
        child.wait(10)
    finally:
        child.kill()
    assert _wait(lambda: _stats(daemon)["leases_held"] == 0), "a dead client's lease was not reaped"
    assert _stats(daemon)["active_sessions"] < before["active_sessions"]
    with _engine(daemon.url) as b:  # engine B, another process
        r = b.retrieve(make_tokens(n, seed=seed))
        assert r.num_tokens == n and r.kv is not None
        assert torch.equal(r.kv, make_kv(n, seed=seed))  # bit-identical


def test_stuck_client_lease_times_out(daemon: DaemonProcess) -> None:
    with _engine(daemon.url) as eng:
        tokens = make_tokens(32, seed=5)
        eng.store(tokens, make_kv(32, seed=5))
        tier = eng.storage.tiers[0]
        held = tier.get(eng.keys(tokens)[0].digest)
        assert held is not None
        reaped = _stats(daemon)["leases_reaped"]
        assert _wait(lambda: _stats(daemon)["leases_reaped"] > reaped, 10.0)  # lease timeout is 2 s
        held.release()  # late: harmless


def test_client_survives_daemon_crash_and_restart(tmp_path: Path) -> None:
    d1 = DaemonProcess("--cpu-size", "32MiB").start()
    port, seg1 = d1.port, d1.info["shm_path"]
    tokens, kv = make_tokens(64, seed=2), make_kv(64, seed=2)
    eng = _engine(d1.url)
    try:
        assert eng.store(tokens, kv) == 64 and eng.lookup(tokens) == 64
        d1.kill()  # SIGKILL: no cleanup, the segment stays behind
        assert os.path.exists(seg1)
        t0 = time.monotonic()
        assert eng.lookup(tokens) == 0 and eng.retrieve(tokens).num_tokens == 0  # misses, no exception
        assert eng.store(tokens, kv) == 0
        assert time.monotonic() - t0 < 10  # failing fast, not a timeout per call
        d2 = DaemonProcess("--cpu-size", "32MiB", "--port", str(port)).start()
        try:
            assert not os.path.exists(seg1), "the restarted daemon did not reap the dead one's segment"
            assert _wait(lambda: eng.store(tokens, kv) == 64, 10.0)  # reconnected (after backoff)
            r = eng.retrieve(tokens)
            assert r.num_tokens == 64 and r.kv is not None and torch.equal(r.kv, kv)
            assert eng.storage.tiers[0].shm  # back on shared memory with the new segment
            assert eng.storage.tiers[0].stats().errors >= 1
            seg2 = d2.info["shm_path"]
        finally:
            assert d2.terminate() == 0  # SIGTERM: graceful
        assert not os.path.exists(seg2) and not os.path.exists(d2.ready_file)
        assert "kvtier server stopped" in d2.log_tail()
        assert eng.lookup(tokens) == 0  # gone again: a miss
    finally:
        eng.close()
        d1.kill()


def _disk_tier_available(tmp_path: Path) -> bool:
    cfg = Config.load(env={}, cpu__enabled=False, disk__enabled=True, disk__path=str(tmp_path / "probe"))
    try:
        tiers = build_tiers(cfg)
    except ValueError:
        return False
    for t in tiers:
        t.close()
    return any(t.name == "disk" for t in tiers)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_restarted_daemon_serves_from_its_disk_tier(tmp_path: Path, stop: str) -> None:
    if not _disk_tier_available(tmp_path):
        pytest.skip("build_tiers has no disk tier yet")
    args = ("--cpu-size", "16MiB", "--disk-path", str(tmp_path / "disk"), "--disk-size", "64MiB")
    tokens, kv = make_tokens(96, seed=9), make_kv(96, seed=9)
    d1 = DaemonProcess(*args).start()
    with _engine(d1.url) as eng:
        assert eng.store(tokens, kv) == 96
    if stop == "sigterm":
        assert d1.terminate() == 0  # drains the write queue, syncs the disk tier
    else:  # a crash after the writes reached the disk tier (its files are renamed into place)
        assert _wait(lambda: _stats(d1).get("puts", 0) >= 6)
        time.sleep(1.0)
        d1.kill()
    with DaemonProcess(*args, "--port", str(d1.port)) as d2, _engine(d2.url) as eng:
        r = eng.retrieve(tokens)
        assert r.num_tokens == 96 and r.kv is not None and torch.equal(r.kv, kv)
