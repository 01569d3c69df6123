"""Many client processes storing and retrieving overlapping prompts through one small daemon.

Checks: every retrieved token's KV equals the KV its prompt was stored with (exact comparison
of every element, a stronger check than a checksum); no lost chunk (a prompt a client stored is
found again while it fits); no deadlock (every client finishes within a bound and makes progress);
daemon RSS stays within its pool capacity plus a fixed overhead while evictions run.

Default: 4 processes x 10 s (2-core CI). ``KVTIER_SOAK=1``: 16 processes x 60 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kvtier.server.process import DaemonProcess
from kvtier.tiers.remote import RemoteTier

ROOT = Path(__file__).resolve().parents[2]
SOAK = os.environ.get("KVTIER_SOAK") == "1"
PROCS, SECONDS = (16, 60.0) if SOAK else (4, 10.0)
CAPACITY = 24 << 20

CLIENT = """
import json, sys, time, random, torch
from kvtier import CacheEngine, Config
url, seed, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
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
out = dict(ops=0, stores=0, hit_tokens=0, checked_elems=0, mismatches=0, lost=0)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
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
        eng.store(tokens, kv_of(tokens))
        out["stores"] += 1
        # just stored, small next to the pool: it must be found (unless evicted by others at once)
        if eng.lookup(tokens) < (tokens.numel() // 16) * 16:
            out["lost"] += 1
    out["ops"] += 1
eng.close()
print(json.dumps(out), flush=True)
"""


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_concurrent_clients_overlapping_prompts() -> None:
    with DaemonProcess("--cpu-size", str(CAPACITY), "--chunk-tokens", "16") as d:
        base_rss = _rss_bytes(d.pid)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CLIENT,
                    d.url + ("" if i % 2 == 0 else "?shm=0"),
                    str(i),
                    str(SECONDS),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=str(ROOT),
            )
            for i in range(PROCS)
        ]
        max_rss = base_rss
        deadline = time.monotonic() + SECONDS + 120  # startup + a bound: past it, a deadlock
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            max_rss = max(max_rss, _rss_bytes(d.pid))
            time.sleep(0.2)
        hung = [p.pid for p in procs if p.poll() is None]
        for p in procs:
            p.kill()
        assert not hung, f"clients {hung} did not finish: deadlock?"
        results = []
        for p in procs:
            out, err = p.communicate()
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        stats = RemoteTier(d.url).stats()  # the daemon still answers
    total = {k: sum(r[k] for r in results) for k in results[0]}
    print(f"\n{PROCS} clients x {SECONDS:.0f}s: {total}; daemon RSS {base_rss >> 20} -> {max_rss >> 20} MiB; "
          f"evictions {stats.evictions}")  # fmt: skip
    assert all(r["ops"] > 0 for r in results), results
    assert total["mismatches"] == 0 and total["checked_elems"] > 0
    assert total["lost"] <= total["stores"] // 20, total  # eviction by other clients can race a lookup
    assert stats.evictions > 0  # the pool was full: eviction ran under load
    assert max_rss - base_rss <= CAPACITY + (96 << 20), (base_rss, max_rss)
