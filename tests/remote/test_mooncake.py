"""The Mooncake Store tier against a real ``mooncake_master`` (and ``mooncake_client`` store
service): sharing across processes, a master killed mid-run, corrupt objects, refusals, URLs.

The conformance suite (tests/tiers) covers the Tier contract; these cover what is Mooncake's own.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.remote import servers
from tests.remote.test_sharing import run

from kvtier.chunk import Chunk
from kvtier.config import ConfigError, parse_mooncake_url

pytestmark = pytest.mark.skipif(servers.MOONCAKE_MASTER is None, reason=servers.NO_MOONCAKE_REASON)


@pytest.fixture
def master() -> Iterator[servers.MooncakeMaster]:
    m = servers.MooncakeMaster().start()
    yield m
    m.cleanup()


def _tier(url: str, **kw: object):
    from kvtier.tiers.mooncake import MooncakeTier

    return MooncakeTier(url, key_prefix=f"t{uuid.uuid4().hex[:12]}", **kw)  # type: ignore[arg-type]


def _chunk(n: int = 32, seed: int = 0) -> Chunk:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, n, 2, 8, generator=g).to(torch.bfloat16)
    return Chunk(kv, b"f" * 16, n)


def test_process_b_retrieves_what_process_a_stored_through_a_store_service(
    master: servers.MooncakeMaster, tmp_path: Path
) -> None:
    """Engines contribute no memory (segment=0); a standalone store service holds the chunks, so
    they outlive the engine process that stored them (A exits before B starts)."""
    store = master.start_store()
    try:
        url = f"mooncake://127.0.0.1:{master.port}?segment=0&buffer=32MiB"
        salt = uuid.uuid4().hex
        a = run("store", url, "", salt, tmp_path / "a.pt", "1")
        b = run("retrieve", url, "", salt, tmp_path / "b.pt", "2")
        assert a["stored"] == 100
        assert b["lookup"] == b["num_tokens"] == 100
        assert torch.equal(b["kv"], a["kv"])
    finally:
        store.kill()
        store.wait(timeout=10)


def test_master_killed_mid_run_is_a_miss_then_recovers(master: servers.MooncakeMaster) -> None:
    tier = _tier(master.url, timeout_s=5.0, retry_backoff_s=0.1, retry_backoff_max_s=0.2)
    try:
        c = _chunk()
        assert tier.put(b"k" * 16, c)
        assert tier.prefix_contains([b"k" * 16]) == 1
        master.kill()
        # every call is a miss / a skipped write, never an exception
        assert tier.prefix_contains([b"k" * 16]) == 0
        assert tier.get(b"k" * 16) is None
        assert tier.put(b"j" * 16, c) is False
        assert tier.stats().errors >= 1
        master.start()  # same ports; its metadata is gone (the master keeps it in memory)
        ok = False
        for _ in range(200):  # the breaker's prober closes it within its backoff once the master is back
            if tier.put(b"m" * 16, c):
                ok = True
                break
            import time

            time.sleep(0.05)
        assert ok, "the tier never wrote again after the master came back"
        got = tier.get(b"m" * 16)
        assert got is not None and torch.equal(got.kv, c.kv)
        assert tier.get(b"k" * 16) is None  # forgotten by the restarted master: a miss, not wrong KV
    finally:
        tier.close()


def test_master_down_at_start_is_a_miss(tmp_path: Path) -> None:
    url = f"mooncake://127.0.0.1:{servers.free_port()}?segment=16MiB&buffer=16MiB"
    tier = _tier(url, timeout_s=5.0)
    try:
        assert tier.prefix_contains([b"k" * 16]) == 0
        assert tier.put(b"k" * 16, _chunk()) is False
        assert tier.get(b"k" * 16) is None
    finally:
        tier.close()


def test_corrupt_object_is_a_miss_and_is_removed(master: servers.MooncakeMaster) -> None:
    tier = _tier(master.url, timeout_s=10.0)
    try:
        key = b"c" * 16
        assert tier.put(key, _chunk())
        client = tier._client()
        name = tier._ok(key)
        good = client.get(name)
        assert client.remove(name, True) == 0
        bad = bytearray(good)
        bad[-1] ^= 0xFF  # one flipped payload byte: the checksum must catch it
        assert client.put_parts(name, bytes(bad)) == 0
        assert tier.get(key) is None
        assert tier.prefix_contains([key]) == 0, "the corrupt object was not removed"
        assert tier.put(key, _chunk()), "a clean rewrite after the corrupt object failed"
        assert tier.get(key) is not None
    finally:
        tier.close()


def test_value_over_the_client_buffer_is_refused_once_not_raised(
    master: servers.MooncakeMaster, caplog: pytest.LogCaptureFixture
) -> None:
    tier = _tier(f"mooncake://127.0.0.1:{master.port}?segment=64MiB&buffer=1MiB", timeout_s=10.0)
    try:
        big = _chunk(n=20000)  # ~2.4 MiB > the 1 MiB buffer
        with caplog.at_level(logging.WARNING, logger="kvtier"):
            assert tier.put(b"b" * 16, big) is False
            assert tier.put(b"d" * 16, big) is False
        assert tier.put(b"s" * 16, _chunk())  # the store is up: a small chunk still goes in
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1 and "buffer=" in refused[0].getMessage()
        assert tier.breaker.allow()  # a refusal is not an outage
    finally:
        tier.close()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("mooncake://", "MASTER_HOST:RPC_PORT"),
        ("mooncake://host", "MASTER_HOST:RPC_PORT"),
        ("mooncake://host:1?sement=1GiB", "query keys"),
        ("mooncake://host:1?segment=lots", "segment"),
        ("mooncake://host:1?protocol=udp", "tcp|rdma"),
        ("mooncake://host:1?buffer=4KiB", ">= 1MiB"),
    ],
)
def test_bad_urls_are_one_line_config_errors(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="remote.url") as e:
        parse_mooncake_url(url)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_url_defaults() -> None:
    u = parse_mooncake_url("mooncake://10.0.0.1:50051")
    assert (u.master, u.metadata, u.protocol) == ("10.0.0.1:50051", "P2PHANDSHAKE", "tcp")
    assert u.segment_bytes == 256 * 1024**2 and u.buffer_bytes == 64 * 1024**2


def test_cli_config_accepts_a_mooncake_url(tmp_path: Path) -> None:
    from kvtier import Config
    from kvtier.cli import main

    cfg = Config.load(env={}, remote__url="mooncake://127.0.0.1:1?segment=0")
    assert cfg.remote.url.startswith("mooncake://")
    bad = tmp_path / "bad.yaml"
    bad.write_text("remote:\n  url: mooncake://h\n")
    assert main(["config", "show", "--config", str(bad)]) == 2


def test_hung_master_costs_one_timeout_and_never_stalls_the_process(master: servers.MooncakeMaster) -> None:
    """SIGSTOP: the master accepts nothing and answers nothing. The first call waits one
    ``timeout_s`` and opens the breaker; the next is a miss at once; other threads keep running
    throughout (Mooncake's calls release the GIL; ours are waited for on a pool)."""
    import os
    import signal
    import threading
    import time

    tier = _tier(master.url, timeout_s=2.0)
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.02)

    try:
        assert tier.put(b"k" * 16, _chunk())
        th = threading.Thread(target=tick, daemon=True)
        th.start()
        assert master.proc is not None
        os.kill(master.proc.pid, signal.SIGSTOP)
        try:
            assert tier.prefix_contains([b"k" * 16]) == 0
            assert not tier.breaker.allow() or tier.get(b"k" * 16) is None
            t0 = time.monotonic()
            assert tier.get(b"k" * 16) is None
            assert time.monotonic() - t0 < 1.0, "an open breaker must answer without touching the store"
        finally:
            os.kill(master.proc.pid, signal.SIGCONT)
        stop.set()
        th.join(timeout=10)
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert gaps and max(gaps) < 1.5, f"another thread stalled for {max(gaps):.2f}s (GIL held?)"
    finally:
        stop.set()
        tier.close()
