"""Disk and Redis tokens per second with and without KV compression (CPU, one run).

Each configuration stores the same prompt's KV (SmolLM2-135M geometry: 30 layers, 3 KV heads,
head_dim 64, bf16; 256-token chunks) into an engine whose only tier is the disk or a local Redis,
flushes, then a second engine (nothing in process memory) retrieves it. Tokens per second =
prompt tokens / wall seconds of that store+flush or retrieve; bytes = what the tier holds. The KV
is random normal data: the lossy codecs' sizes do not depend on it, zstd's would (on real KV:
benchmarks/RESULTS.md, "KV compression").

Run: ``PYTHONPATH=src python benchmarks/bench_kv_codec_tiers.py [--tokens 8192] [--reps 3]``.
Redis: a ``redis-server`` on PATH is started on a free port (skipped if there is none).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid

import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.keys import Namespace

L, H, D, CT = 30, 3, 64, 256
CONFIGS = [("none", "raw"), ("none", "zstd"), ("int8", "raw"), ("int8", "zstd"), ("int4", "raw")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(tier: str, where: str, codec: str, serde: str, toks: list[int], kv: torch.Tensor, reps: int) -> str:
    sets: dict[str, str] = {
        "chunk__chunk_tokens": str(CT),
        "chunk__kv_codec": codec,
        "cpu__enabled": "false",
        "remote__timeout_s": "30",  # a loaded box must not turn a slow write into a miss
        "storage__queue_timeout_s": "30",
    }
    if tier == "disk":
        sets.update(
            disk__enabled="true",
            disk__path=f"{where}/{uuid.uuid4().hex}",
            disk__serde=serde,
            disk__max_disk_bytes="8GiB",
        )
    else:
        sets.update(remote__url=where, remote__serde=serde)
    st, rt, used = [], [], 0
    for _ in range(reps):
        ns = Namespace("bench", "bfloat16", (L, H, D), kv_codec=codec, cache_salt=uuid.uuid4().hex)
        w = CacheEngine(Config.load(env={}, **sets), namespace=ns)
        t0 = time.perf_counter()
        assert w.store(toks, kv) == len(toks)
        assert w.flush(60.0)
        st.append(time.perf_counter() - t0)
        used = used or sum(t.stats().bytes_used for t in w.storage.tiers)
        w.close()
        r = CacheEngine(Config.load(env={}, **sets), namespace=ns)
        t0 = time.perf_counter()
        got = r.retrieve(toks)
        rt.append(time.perf_counter() - t0)
        assert got.num_tokens == len(toks), (tier, codec, serde, got.num_tokens)
        r.close()
    raw = kv.numel() * kv.element_size()
    n = len(toks)
    return (
        f"| {tier} | {codec} | {serde} | {used / raw:.3f} | {n / statistics.median(st):,.0f} "
        f"| {n / statistics.median(rt):,.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiers", default="disk,redis")
    a = ap.parse_args()
    torch.set_num_threads(1)
    toks = list(range(a.tokens))
    kv = torch.randn(L, 2, a.tokens, H, D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    print(
        f"kvtier bench_kv_codec_tiers, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{a.tokens} tokens, {kv.numel() * 2 / 1e6:.0f} MB raw bf16 KV, median of {a.reps}, 1 torch thread"
    )
    print("| tier | kv_codec | serde | stored / raw bytes | store+flush tokens/s | retrieve tokens/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for codec, serde in CONFIGS if "disk" in a.tiers else []:
            print(run("disk", f"{d}/{codec}-{serde}", codec, serde, toks, kv, a.reps), flush=True)
    exe = shutil.which("redis-server")
    if "redis" not in a.tiers:
        return
    if exe is None:
        print("(no redis-server on PATH: Redis rows skipped)")
        return
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--maxmemory", "4gb"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        for codec, serde in CONFIGS:
            print(run("redis", f"redis://127.0.0.1:{port}/0", codec, serde, toks, kv, a.reps), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
