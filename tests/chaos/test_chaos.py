"""The chaos suite: the real engine and the real daemon driven through ``tiers/fault.py`` (errors,
hangs, latency, corrupt and torn reads, full stores) by concurrent requests that share prefixes.

Asserted, whatever the faults: 0 wrong KV (every retrieved token equals what was stored for it),
0 failed requests (no call raises), every cache call's wait bounded, the process's memory
bounded. The figures are printed (``-s``): faults injected by kind, requests, hits, max wait.

Bounded, not tuned to the machine: a fixed number of requests (a few seconds on 2 cores), seeded
faults. The wait bound is ``WAIT_BOUND_S``: a hang fault sleeps ``HANG_S`` and each engine call
asks each faulted tier a bounded number of times; a real stalled store costs one ``timeout_s``
per request through the circuit breaker, which ``tests/remote/test_outage.py`` checks.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess
from kvtier.tiers.fault import FaultTier

_R = TypeVar("_R")
HANG_S = 0.05
WAIT_BOUND_S = 1.5  # >> the worst plausible call (a few hangs + a loaded box), << a stuck request
RSS_BOUND_BYTES = 400 * 1024**2
FAULTS = dict(
    fault__error_rate=0.05,
    fault__hang_rate=0.03,
    fault__hang_s=HANG_S,
    fault__corrupt_rate=0.05,
    fault__torn_rate=0.05,
    fault__full_rate=0.05,
    fault__latency_s=0.001,
)
CHUNK = 16
GROUPS, PER_GROUP, THREADS, ROUNDS = 4, 4, 3, 6


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def prompts() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prompts in groups that share a 48-token prefix (so requests overlap on chunks)."""
    out = []
    for g in range(GROUPS):
        pt, pk = make_tokens(48, seed=1000 + g), make_kv(48, seed=1000 + g)
        for j in range(PER_GROUP):
            st, sk = make_tokens(32, seed=2000 + g * 100 + j), make_kv(32, seed=2000 + g * 100 + j)
            out.append((torch.cat([pt, st]), torch.cat([pk, sk], dim=2)))
    return out


def drive(eng: CacheEngine) -> dict[str, float]:
    """THREADS threads x ROUNDS passes over the prompts: lookup, retrieve (checked), store."""
    ps = prompts()
    wrong, failed, requests, hit_tokens = [0], [0], [0], [0]
    waits: list[float] = []
    lock = threading.Lock()

    def timed(fn: Callable[..., _R], *args: object) -> _R:
        t0 = time.monotonic()
        r = fn(*args)
        with lock:
            waits.append(time.monotonic() - t0)
        return r

    def worker(w: int) -> None:
        for r in range(ROUNDS):
            for i in range(len(ps)):
                tokens, kv = ps[(i * (w + 1) + r) % len(ps)]
                try:
                    timed(eng.lookup, tokens)
                    got = timed(eng.retrieve, tokens)
                    n = got.num_tokens
                    bad = n > 0 and not torch.equal(got.kv, kv[:, :, :n])
                    timed(eng.store, tokens, kv)
                except Exception:  # a failed request is what this suite counts; re-raised below
                    with lock:
                        failed[0] += 1
                    raise
                with lock:
                    requests[0] += 1
                    hit_tokens[0] += n
                    wrong[0] += bad

    rss0 = rss_bytes()
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            worker(w)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    return dict(
        requests=requests[0],
        hit_tokens=hit_tokens[0],
        wrong=wrong[0],
        failed=failed[0],
        max_wait_s=max(waits),
        seconds=time.monotonic() - t0,
        rss_growth=rss_bytes() - rss0,
    )


def injected(eng: CacheEngine) -> Counter[str]:
    c: Counter[str] = Counter()
    for t in eng.storage.tiers:
        if isinstance(t, FaultTier):
            c.update({f"{t.name}.{k}": v for k, v in t.injected.items()})
    return c


def check(name: str, eng: CacheEngine, fig: dict[str, float]) -> None:
    faults = injected(eng)
    print(
        f"\nchaos {name}: {fig['requests']} requests in {fig['seconds']:.1f} s, {fig['hit_tokens']} tokens "
        f"served from cache, wrong KV {fig['wrong']}, failed {fig['failed']}, max cache wait "
        f"{fig['max_wait_s'] * 1000:.0f} ms, RSS growth {fig['rss_growth'] / 2**20:.0f} MiB\n"
        f"  faults injected ({sum(v for k, v in faults.items() if not k.endswith('_detected'))}): "
        f"{dict(sorted(faults.items()))}"
    )
    assert fig["requests"] == THREADS * ROUNDS * GROUPS * PER_GROUP and fig["failed"] == 0
    assert fig["wrong"] == 0
    assert fig["hit_tokens"] > 0  # the cache still works through the faults
    assert sum(faults.values()) > 0  # faults really were injected
    for kind in ("corrupt", "torn"):  # every damaged read was caught by the real checks
        for k, v in faults.items():
            if k.endswith(f".{kind}"):
                assert faults.get(f"{k}_detected", 0) == v, faults
    assert fig["max_wait_s"] <= WAIT_BOUND_S
    assert fig["rss_growth"] <= RSS_BOUND_BYTES


def test_engine_through_faulty_cpu_and_disk(tmp_path: Path) -> None:
    cfg = Config.load(
        env={},
        chunk_tokens=CHUNK,
        model__model_id="chaos",
        cpu__max_bytes="1MiB",
        disk__enabled=True,
        disk__path=str(tmp_path / "disk"),
        disk__max_disk_bytes="64MiB",
        fault__tiers="cpu,disk",
        fault__seed=7,
        **FAULTS,
    )
    eng = CacheEngine(cfg)
    try:
        check("engine cpu+disk", eng, drive(eng))
    finally:
        eng.close()


@pytest.fixture
def faulty_daemon(tmp_path: Path) -> DaemonProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    env.update(
        KVTIER_DISK__ENABLED="true",
        KVTIER_DISK__PATH=str(tmp_path / "ddisk"),
        KVTIER_FAULT__TIERS="disk",
        KVTIER_FAULT__ERROR_RATE="0.05",
        KVTIER_FAULT__TORN_RATE="0.05",
        KVTIER_FAULT__FULL_RATE="0.05",
        KVTIER_FAULT__HANG_RATE="0.02",
        KVTIER_FAULT__HANG_S=str(HANG_S),
    )
    d = DaemonProcess("--cpu-size", "2MiB", env=env).start()
    yield d  # type: ignore[misc]
    d.kill()
    d.cleanup()


def test_daemon_through_faulty_client_and_disk(faulty_daemon: DaemonProcess) -> None:
    cfg = Config.load(
        env={},
        chunk_tokens=CHUNK,
        model__model_id="chaos",
        cpu__enabled=False,
        remote__url=faulty_daemon.url,
        remote__timeout_s=2.0,
        fault__tiers="remote",
        fault__seed=11,
        **FAULTS,
    )
    eng = CacheEngine(cfg)
    try:
        check("engine -> daemon", eng, drive(eng))
    finally:
        eng.close()
