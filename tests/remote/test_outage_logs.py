"""A daemon outage is ONE warning line in the client's log (the breaker opening) and one INFO line
when the daemon is back, however many requests ran meanwhile; refused calls warn once. Real daemon
killed and restarted on the same port (issue 18: the client used to log 35 WARNINGs per outage)."""

from __future__ import annotations

import logging
import time

import pytest
from tests.conftest import make_kv, make_tokens
from tests.remote import servers

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess
from kvtier.tiers.remote import RemoteTier
from kvtier.wire import protocol as P


def _kvtier_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("kvtier") and r.levelno == level]


def test_an_outage_is_one_warning_and_one_recovery_line(caplog: pytest.LogCaptureFixture) -> None:
    port = servers.free_port()
    first = DaemonProcess("--cpu-size", "32MiB", "--port", str(port)).start()
    cfg = Config.load(
        env={},
        chunk_tokens=16,
        cpu__enabled=False,
        model__model_id="outage-logs",
        remote__url=first.url,
        remote__timeout_s=0.5,
        remote__retry_backoff_s=0.1,
        remote__retry_backoff_max_s=0.5,
    )
    eng = CacheEngine(cfg)
    second: DaemonProcess | None = None
    try:
        caplog.set_level(logging.DEBUG, logger="kvtier")
        tokens, kv = make_tokens(64, seed=1), make_kv(64, seed=1)
        assert eng.store(tokens, kv) == 64
        first.kill()
        for i in range(30):  # requests during the outage: misses, no exception
            t, k = make_tokens(64, seed=100 + i), make_kv(64, seed=100 + i)
            assert eng.lookup(t) == 0
            eng.store(t, k)
        warnings = _kvtier_records(caplog, logging.WARNING)
        assert len(warnings) == 1, warnings
        assert "circuit closed -> open" in warnings[0] and str(port) in warnings[0]
        assert eng.stats().tiers["remote"].errors >= 3  # every failure is still counted

        second = DaemonProcess("--cpu-size", "32MiB", "--port", str(port)).start()
        deadline = time.monotonic() + 30
        while eng.store(tokens, kv) == 0 or eng.lookup(tokens) != 64:  # back: a fresh daemon
            assert time.monotonic() < deadline, "the client never reconnected"
            time.sleep(0.1)
        recovered = [m for m in _kvtier_records(caplog, logging.INFO) if "-> closed" in m]
        assert len(recovered) == 1, recovered
        assert len(_kvtier_records(caplog, logging.WARNING)) == 1
    finally:
        eng.close()
        for d in (first, second):
            if d is not None:
                d.kill()
                d.cleanup()


def test_refused_calls_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    d = DaemonProcess("--cpu-size", "32MiB").start()
    tier = RemoteTier(d.url, timeout_s=5.0)
    try:
        caplog.set_level(logging.DEBUG, logger="kvtier")
        hello = P.Hello(P.PROTOCOL_VERSION, "", False, "test")  # refused after the handshake
        for _ in range(5):
            assert tier._call("hello", lambda c: c._roundtrip(hello, []), None) is None
        warnings = _kvtier_records(caplog, logging.WARNING)
        assert len(warnings) == 1 and "refused hello" in warnings[0], warnings
        assert tier.stats().errors == 5
        assert tier.contains(b"\0" * 16) is False  # the connection still works: a plain miss
    finally:
        tier.close()
        d.kill()
        d.cleanup()
