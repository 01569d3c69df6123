"""``engine.flush()`` in daemon mode: ``True`` means the chunks are on the daemon's disk.

Issue 22 (1): the protocol had no flush, so ``flush()`` returned at once while the daemon had
only queued the disk writes; a daemon SIGKILLed right after it lost them (0 of 8 came back).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess

CHUNK = 64  # tokens; with 8 layers x 2 x 8 heads x 128 dims of fp32: 4 MiB per chunk


def _engine(url: str) -> CacheEngine:
    cfg = Config.load(
        env={}, cpu__enabled=False, remote__url=url, chunk_tokens=CHUNK, model__model_id="flush"
    )
    eng = CacheEngine(cfg)
    eng.bind_model(8, 8, 128, torch.float32)
    return eng


def test_flush_true_means_on_disk_even_if_the_daemon_is_killed_at_once(tmp_path: Path) -> None:
    n = 16 * CHUNK  # 16 chunks, 64 MiB: the disk writes take far longer than a kill
    tokens = make_tokens(n, seed=4)
    kv = make_kv(n, seed=4, layers=8, heads=8, dim=128)
    args = ("--cpu-size", "128MiB", "--disk-path", str(tmp_path / "disk"), "--disk-size", "256MiB")
    d1 = DaemonProcess(*args).start()
    try:
        with _engine(d1.url) as eng:
            assert eng.store(tokens, kv) == n
            assert eng.flush() is True
            d1.kill()  # SIGKILL right after flush() returned
    finally:
        d1.kill()
    with DaemonProcess(*args, "--port", str(d1.port)) as d2, _engine(d2.url) as eng:
        assert eng.lookup(tokens) == n
        r = eng.retrieve(tokens)
        assert r.num_tokens == n and r.kv is not None and torch.equal(r.kv, kv)


def test_flush_is_false_while_the_daemon_is_down(tmp_path: Path) -> None:
    d = DaemonProcess("--cpu-size", "8MiB").start()
    with _engine(d.url) as eng:
        assert eng.flush() is True  # nothing durable configured, nothing pending: trivially true
        d.kill()
        assert eng.flush() is False  # not known to be durable
