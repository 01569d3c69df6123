"""Many client processes storing and retrieving overlapping prompts through one small daemon.

Checks: every retrieved token's KV equals the KV its prompt was stored with (exact comparison
of every element, a stronger check than a checksum); no lost chunk (a prompt a client just stored
is found whole again unless the daemon evicted something in between); no deadlock (every client finishes within a bound and makes progress);
daemon RSS stays within its pool capacity plus a fixed overhead while evictions run.

Default: 4 processes x 10 s (2-core CI). ``KVTIER_SOAK=1``: 16 processes x 60 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvtier.server.process import DaemonProcess
from kvtier.tiers.remote import RemoteTier

ROOT = Path(__file__).resolve().parents[2]
SOAK = os.environ.get("KVTIER_SOAK") == "1"
PROCS, SECONDS = (16, 60.0) if SOAK else (4, 10.0)
CAPACITY = 12 << 20  # below the prompts' working set (~15 MiB): eviction runs all the time

CLIENT = """
import json, sys, time, random, torch
from kvtier import CacheEngine, Config
url, seed, seconds, progress = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
L, H, D = 4, 2, 64  # 16-token chunks of 64 KiB

def kv_of(tokens):
    # KV is a pure function of (token, position): a shared prefix has one KV whatever prompt holds it
    t = tokens.to(torch.float32)[None, None, :, None, None]
    pos = torch.arange(tokens.numel(), dtype=torch.float32)[None, None, :, None, None]
    pat = torch.arange(L * 2 * H * D, dtype=torch.float32).reshape(L, 2, 1, H, D)
    return t * 1e-3 + pos * 1e-5 + pat

docs = [torch.randint(0, 50000, (512,), generator=torch.Generator().manual_seed(d)) for d in range(6)]
cfg = Config.load(env={}, cpu__enabled=False, remote__url=url, chunk_tokens=16, model__model_id="conc",
                  remote__timeout_s=10.0)
eng = CacheEngine(cfg)
eng.bind_model(L, H, D, torch.float32)
rng = random.Random(seed)
out = dict(ops=0, stores=0, hit_tokens=0, checked_elems=0, mismatches=0, lost=0, evicted_meanwhile=0)
tier = eng.storage.tiers[0]
eng.lookup([1])  # connected: the clock starts now
deadline = time.monotonic() + seconds
beat = 0.0
while time.monotonic() < deadline:
    if time.monotonic() - beat > 1.0:
        beat = time.monotonic()
        with open(progress, "w") as f:
            f.write(str(out["ops"]))
    doc = docs[rng.randrange(len(docs))]
    suffix = torch.randint(0, 50000, (rng.randrange(0, 48),), generator=torch.Generator().manual_seed(rng.randrange(8)))
    tokens = torch.cat([doc[: rng.randrange(64, 513)], suffix])
    r = eng.retrieve(tokens)
    if r.num_tokens:
        want = kv_of(tokens[: r.num_tokens])
        out["mismatches"] += int((r.kv != want).any())
        out["checked_elems"] += want.numel()
        out["hit_tokens"] += r.num_tokens
    if r.num_tokens < tokens.numel():
        ev0 = tier.stats().evictions
        eng.store(tokens, kv_of(tokens))
        out["stores"] += 1
        # just stored: every chunk must be found, unless the daemon evicted something meanwhile
        if eng.lookup(tokens) < tokens.numel():
            out["lost" if tier.stats().evictions == ev0 else "evicted_meanwhile"] += 1
    out["ops"] += 1
eng.close()
with open(progress, "w") as f:
    f.write("done " + json.dumps(out))
"""


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_concurrent_clients_overlapping_prompts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_SOAK"}  # not a config key
    with DaemonProcess("--cpu-size", str(CAPACITY), "--chunk-tokens", "16", env=env) as d:
        base_rss = _rss_bytes(d.pid)
        progress = [tmp_path / f"progress-{i}" for i in range(PROCS)]
        procs = []
        for i in range(PROCS):
            url = d.url + ("" if i % 2 == 0 else "?shm=0")  # half by shared memory, half by socket
            with open(tmp_path / f"stderr-{i}", "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", CLIENT, url, str(i), str(SECONDS), str(progress[i])],
                        stderr=err,
                        cwd=str(ROOT),
                        env=env,
                    )
                )
        max_rss = base_rss

        def wait(cond: Callable[[], bool], timeout_s: float) -> None:
            nonlocal max_rss
            deadline = time.monotonic() + timeout_s
            while not cond() and time.monotonic() < deadline and all(p.poll() in (None, 0) for p in procs):
                max_rss = max(max_rss, _rss_bytes(d.pid))
                time.sleep(0.2)

        wait(lambda: all(p.exists() for p in progress), 30.0 * PROCS)  # start-up (imports) on 2 cores
        started = sum(p.exists() for p in progress)
        wait(lambda: all(p.poll() is not None for p in procs), SECONDS + 60.0)  # then a bound: past it, stuck
        states = [p.read_text() if p.exists() else "not started" for p in progress]
        for p in procs:
            p.kill()
            p.wait()
        errs = [(tmp_path / f"stderr-{i}").read_text()[-2000:] for i in range(PROCS)]
        assert started == PROCS, f"only {started} of {PROCS} clients started: {errs}"
        assert all(s.startswith("done") for s in states), f"clients stuck (ops so far): {states} {errs}"
        assert all(p.returncode == 0 for p in procs), errs
        results = [json.loads(s.removeprefix("done ")) for s in states]
        stats = RemoteTier(d.url, timeout_s=30.0).stats()  # the daemon still answers
    total = {k: sum(r[k] for r in results) for k in results[0]}
    print(
        f"\n{PROCS} clients x {SECONDS:.0f}s: {total}; daemon RSS {base_rss >> 20} -> {max_rss >> 20} MiB; "
        f"evictions {stats.evictions}"
    )
    assert all(r["ops"] > 0 for r in results), results
    assert total["mismatches"] == 0 and total["checked_elems"] > 0
    assert total["lost"] == 0, total  # a stored prompt missing with no eviction in between
    assert stats.evictions > 0  # the pool was full: eviction ran under load
    assert max_rss - base_rss <= CAPACITY + (96 << 20), (base_rss, max_rss)
