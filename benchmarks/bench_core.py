"""Core benchmark (issue 3): key hashing, lookup, and CPU-tier store/retrieve bandwidth.

Bandwidth is reported next to a plain ``torch`` copy of the same bytes measured in the same run,
so the ratio is meaningful on a shared, noisy machine. Run: ``python benchmarks/bench_core.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvtier import CacheEngine, Config
from kvtier.keys import Namespace, chunk_keys


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per store/retrieve (default 4096)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)

    ns = Namespace("llama-3-8b", "bfloat16", (args.layers, args.kv_heads, args.head_dim))
    toks128k = torch.randint(0, 128000, (131072,))
    toks_list = toks128k.tolist()
    t_keys = best_of(lambda: chunk_keys(toks128k, ns, 256), 20)
    t_keys_list = best_of(lambda: chunk_keys(toks_list, ns, 256), 20)

    n = args.tokens
    kv = torch.randn(args.layers, 2, n, args.kv_heads, args.head_dim).to(torch.bfloat16)
    nbytes = kv.numel() * kv.element_size()
    cfg = Config.load(env={}, cpu__max_bytes=nbytes * 3, cpu__pin_memory="no", model__model_id="llama-3-8b")
    eng = CacheEngine(cfg)
    eng.bind_model(args.layers, args.kv_heads, args.head_dim, torch.bfloat16)
    # lookup of a 128k-token prompt whose first chunks are cached
    eng.store(toks128k[:n], kv)
    t_lookup = best_of(lambda: eng.lookup(toks128k), 20)

    tokens = torch.randint(0, 128000, (n,))
    cpu_tier = eng.storage.tiers[0]

    def store_only() -> float:
        for k in list(cpu_tier.keys()):  # type: ignore[attr-defined]
            cpu_tier.remove(k)
        t0 = time.perf_counter()
        eng.store(tokens, kv)
        return time.perf_counter() - t0

    out = torch.empty_like(kv)
    dst = torch.empty_like(kv)

    def timed(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # Interleave the measurements so a noisy neighbour hits all of them alike.
    store_only()
    eng.retrieve(tokens, out=out)
    dst.copy_(kv)
    runs: dict[str, list[float]] = {"copy": [], "fresh": [], "store": [], "retrieve": [], "retrieve_new": []}
    for _ in range(args.repeat):
        runs["copy"].append(timed(lambda: dst.copy_(kv)))
        runs["store"].append(store_only())
        runs["retrieve"].append(timed(lambda: eng.retrieve(tokens, out=out)))
        runs["fresh"].append(timed(lambda: torch.empty_like(kv).copy_(kv)))
        runs["retrieve_new"].append(timed(lambda: eng.retrieve(tokens)))
    t_copy, t_fresh, t_store, t_retrieve, t_retrieve_new = (
        statistics.median(runs[k]) for k in ("copy", "fresh", "store", "retrieve", "retrieve_new")
    )

    gb = nbytes / 1e9
    print(
        f"# kvtier core benchmark ({args.layers} layers, {args.kv_heads} kv heads, head_dim {args.head_dim}, bf16)"
    )
    print(
        f"keys for 128k tokens (tensor input): {t_keys * 1e3:.2f} ms   (list input: {t_keys_list * 1e3:.2f} ms)"
    )
    print(f"lookup of 128k tokens (tensor input): {t_lookup * 1e3:.2f} ms")
    print(f"bytes per store/retrieve: {nbytes / 2**20:.0f} MiB ({n} tokens)")
    print(f"plain torch copy, preallocated dst: {gb / t_copy:.2f} GB/s")
    print(f"plain torch copy into a new tensor: {gb / t_fresh:.2f} GB/s")
    print(f"CPU tier store:    {gb / t_store:.2f} GB/s = {t_copy / t_store:.2f}x plain copy")
    print(f"CPU tier retrieve into out=: {gb / t_retrieve:.2f} GB/s = {t_copy / t_retrieve:.2f}x plain copy")
    print(
        f"CPU tier retrieve, new tensor: {gb / t_retrieve_new:.2f} GB/s = "
        f"{t_fresh / t_retrieve_new:.2f}x copy into a new tensor"
    )


if __name__ == "__main__":
    main()
