"""Daemon benchmark (issue 7): store/retrieve GB/s through ``kvtier server`` by shared memory and
over TCP, next to the in-process CPU tier and a plain torch copy of the same bytes, in one run;
then lookup requests/s with 1, 4, 16 client processes.

Every path goes through ``CacheEngine.store``/``retrieve`` (keys, fingerprints, validation), so
the ratios are what an engine sees. Modes are interleaved per repetition (noisy shared machine).
Run: ``python benchmarks/bench_server.py`` (``--tokens 1024`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess

LOOKUP_CLIENT = """
import sys, time
from kvtier.wire.client import DaemonClient
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
c = DaemonClient(host, port, timeout_s=10)
c.connect()
keys = [i.to_bytes(16, "big") for i in range(16)]
c.prefix(keys)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    c.prefix(keys)
    n += 1
print(n / (time.perf_counter() - t0))
"""


def engine(args: argparse.Namespace, url: str | None) -> CacheEngine:
    over: dict[str, object] = {"chunk_tokens": args.chunk_tokens, "model__model_id": "bench"}
    if url:
        over.update(cpu__enabled=False, remote__url=url, remote__timeout_s=60.0)
    else:
        over.update(cpu__max_bytes=args.pool, cpu__pin_memory="no")
    eng = CacheEngine(Config.load(env={}, **over))
    eng.bind_model(args.layers, args.kv_heads, args.head_dim, torch.bfloat16)
    return eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per store/retrieve (default 2048)")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pool", default="2GiB")
    ap.add_argument("--lookup-seconds", type=float, default=3.0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = (args.layers, 2, args.tokens, args.kv_heads, args.head_dim)
    kv = torch.randn(shape).to(torch.bfloat16)
    nbytes = kv.numel() * kv.element_size()
    out = torch.empty_like(kv)
    res: dict[str, dict[str, list[float]]] = {}

    with DaemonProcess("--cpu-size", args.pool) as d:
        modes = {"in-process cpu": None, "daemon shm": d.url, "daemon tcp": d.url + "?shm=0"}
        engines = {m: engine(args, u) for m, u in modes.items()}
        for eng in engines.values():
            eng.lookup([1])  # connect
        assert engines["daemon shm"].storage.tiers[0].shm  # type: ignore[attr-defined]
        assert not engines["daemon tcp"].storage.tiers[0].shm  # type: ignore[attr-defined]
        for rep in range(args.repeat + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            out.copy_(kv)
            memcpy = time.perf_counter() - t0
            for m, eng in engines.items():
                tokens = torch.arange(args.tokens) + 100_000 * (rep + 1) + 1_000_000 * list(modes).index(m)
                t0 = time.perf_counter()
                stored = eng.store(tokens, kv)
                t_store = time.perf_counter() - t0
                t0 = time.perf_counter()
                r = eng.retrieve(tokens)
                t_ret = time.perf_counter() - t0
                assert stored == args.tokens and r.num_tokens == args.tokens and r.kv is not None
                assert torch.equal(r.kv, kv)
                for k in eng.keys(tokens):  # free the space again: every rep reuses warm pool memory
                    eng.storage.remove(k.digest)
                if rep:
                    res.setdefault(m, {"store": [], "retrieve": []})
                    res[m]["store"].append(nbytes / t_store / 1e9)
                    res[m]["retrieve"].append(nbytes / t_ret / 1e9)
                    res.setdefault("torch copy", {"store": [], "retrieve": []})
            if rep:
                res["torch copy"]["store"].append(nbytes / memcpy / 1e9)
                res["torch copy"]["retrieve"].append(nbytes / memcpy / 1e9)
        for eng in engines.values():
            eng.close()

        lookups: dict[int, float] = {}
        for n in (1, 4, 16):
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", LOOKUP_CLIENT, "127.0.0.1", str(d.port), str(args.lookup_seconds)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(n)
            ]
            lookups[n] = sum(float(p.communicate(timeout=300)[0]) for p in procs)

    med = {m: {op: statistics.median(v) for op, v in ops.items()} for m, ops in res.items()}
    cpu = med["in-process cpu"]
    print(
        f"{nbytes / 2**20:.0f} MiB per op ({args.tokens} tokens, bf16 {args.layers}x{args.kv_heads}x"
        f"{args.head_dim}, {args.chunk_tokens}-token chunks), median of {args.repeat}"
    )
    print(f"{'path':<16}{'store GB/s':>12}{'x cpu':>8}{'retrieve GB/s':>15}{'x cpu':>8}")
    for m, v in med.items():
        print(
            f"{m:<16}{v['store']:>12.2f}{v['store'] / cpu['store']:>8.2f}"
            f"{v['retrieve']:>15.2f}{v['retrieve'] / cpu['retrieve']:>8.2f}"
        )
    print(
        "lookup requests/s (16 keys each), total over clients: "
        + ", ".join(f"{n} client{'s' if n > 1 else ''}: {v:,.0f}" for n, v in lookups.items())
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_gbps": med, "lookups_per_s": lookups, "bytes_per_op": nbytes}, f, indent=2)


if __name__ == "__main__":
    main()
