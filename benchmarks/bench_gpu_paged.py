"""Paged KV gather/scatter between GPU and pinned host memory, Llama-3-8B shape (issue 8).

32 layers, 8 kv heads, head_dim 128, bf16, vLLM NHD blocks of 16, 32k tokens over a random
block table (2048 of 4096 blocks): 4 GiB of KV each way. Compares, per direction:
pinned memcpy of the same bytes (the ceiling), naive torch (index_select + copy), and the
kvtier kernels (zero-copy into mapped pinned memory, and staging rings of several sizes).
Then a layer-wise retrieve overlapped with a simulated 32-layer prefill vs serialized.

Run: ``PYTHONPATH=src python3 benchmarks/bench_gpu_paged.py [--tokens N] [--json PATH]``.
Every kvtier result is checked bit-exact against the device gather before it is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from types import SimpleNamespace

import torch

from kvtier.transfer.kernels import gather, scatter
from kvtier.transfer.paged import retrieve_paged, retrieve_paged_layerwise

LAYERS, HEADS, DIM, BS = 32, 8, 128, 16


def timed(fn: Callable[[], object], reps: int = 5) -> float:
    """Median seconds of ``fn`` by CUDA events, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


class HostEngine:
    """Serves one pinned host chunk as a full hit (so timings exclude the tiers)."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    def store(self, tokens: object, kv: torch.Tensor) -> int:
        return 0

    def retrieve(self, tokens: object) -> SimpleNamespace:
        return SimpleNamespace(num_tokens=self.kv.shape[2], kv=self.kv)

    def lookup(self, tokens: object) -> int:
        return self.kv.shape[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n_t = args.tokens
    n_blocks = 2 * (n_t // BS)
    g = torch.Generator().manual_seed(0)
    caches = [
        torch.randn(2, n_blocks, BS, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)
    ]
    table = torch.randperm(n_blocks, generator=g)[: n_t // BS]
    slots = (table[:, None] * BS + torch.arange(BS)).flatten().cuda()
    nbytes = LAYERS * 2 * n_t * HEADS * DIM * 2
    host = torch.empty((LAYERS, 2, n_t, HEADS, DIM), dtype=torch.bfloat16, pin_memory=True)
    dev_flat = torch.empty_like(host, device="cuda")
    ref = gather(caches, slots)
    res: dict[str, float] = {}

    # ceiling: plain pinned memcpy of the same bytes
    res["memcpy_store"] = timed(lambda: host.copy_(dev_flat, non_blocking=True))
    res["memcpy_retrieve"] = timed(lambda: dev_flat.copy_(host, non_blocking=True))

    # naive torch: index_select per layer and plane into a device buffer, then one copy
    def naive_store() -> None:
        for i, c in enumerate(caches):
            for p in range(2):
                torch.index_select(c[p].view(-1, HEADS, DIM), 0, slots, out=dev_flat[i, p])
        host.copy_(dev_flat, non_blocking=True)

    def naive_retrieve() -> None:
        dev_flat.copy_(host, non_blocking=True)
        for i, c in enumerate(caches):
            for p in range(2):
                c[p].view(-1, HEADS, DIM).index_copy_(0, slots, dev_flat[i, p])

    res["naive_store"] = timed(naive_store)
    res["naive_retrieve"] = timed(naive_retrieve)

    variants: list[tuple[str, dict[str, object]]] = [("zero_copy", {"mode": "zero_copy"})]
    for mib in (4, 16, 64):
        variants.append((f"staging_{mib}MiB", {"mode": "staging", "staging_bytes": mib << 20}))
    for name, kw in variants:
        host.zero_()
        gather(caches, slots, out=host, **kw)  # type: ignore[arg-type]
        torch.cuda.synchronize()
        ok_store = torch.equal(host.cuda(), ref)
        res[f"{name}_store"] = timed(lambda kw=kw: gather(caches, slots, out=host, **kw))  # type: ignore[misc]
        host.copy_(ref)
        scratch = [torch.zeros_like(c) for c in caches[:1]] + caches[1:]
        scatter(scratch, slots, host, **kw)  # type: ignore[arg-type]
        torch.cuda.synchronize()
        ok_ret = torch.equal(gather(scratch, slots), ref)
        del scratch
        res[f"{name}_retrieve"] = timed(lambda kw=kw: scatter(caches, slots, host, **kw))  # type: ignore[misc]
        print(f"{name}: bit-exact store={ok_store} retrieve={ok_ret}", flush=True)
        assert ok_store and ok_ret

    # layer-wise retrieve overlapped with a simulated prefill (2 matmuls per layer)
    m, hid, ffn = 8192, 4096, 14336
    x = torch.randn(m, hid, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(hid, ffn, device="cuda", dtype=torch.bfloat16) / 64
    w2 = torch.randn(ffn, hid, device="cuda", dtype=torch.bfloat16) / 64

    def layer_compute() -> None:
        torch.matmul(torch.matmul(x, w1), w2)

    eng = HostEngine(host)
    tokens = range(n_t)

    def compute_only() -> None:
        for _ in range(LAYERS):
            layer_compute()

    def load_only() -> None:
        retrieve_paged_layerwise(eng, tokens, caches, slots).finish()

    def serialized() -> None:
        retrieve_paged(eng, tokens, caches, slots)
        compute_only()

    def overlapped() -> None:
        for _ in retrieve_paged_layerwise(eng, tokens, caches, slots):
            layer_compute()

    for name, fn in (
        ("compute_only", compute_only),
        ("layerwise_load_only", load_only),
        ("serialized", serialized),
        ("overlapped", overlapped),
    ):
        res[name] = timed(fn)

    gbps = {k: nbytes / v / 1e9 for k, v in res.items() if k.endswith(("_store", "_retrieve"))}
    print(f"\nbytes each way: {nbytes / 2**30:.2f} GiB ({n_t} tokens)")
    print("| path | store GPU->host GB/s | x memcpy | retrieve host->GPU GB/s | x memcpy |")
    print("|---|---|---|---|---|")
    for name in ["memcpy", "naive"] + [v[0] for v in variants]:
        s, r = gbps[f"{name}_store"], gbps[f"{name}_retrieve"]
        print(
            f"| {name} | {s:.1f} | {s / gbps['memcpy_store']:.3f} | {r:.1f} | {r / gbps['memcpy_retrieve']:.3f} |"
        )
    print("\n| layer-wise, 32 layers | ms |")
    print("|---|---|")
    for name in ("compute_only", "layerwise_load_only", "serialized", "overlapped"):
        print(f"| {name} | {res[name] * 1e3:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": res, "gbps": gbps, "bytes": nbytes}, f, indent=1)


if __name__ == "__main__":
    main()
