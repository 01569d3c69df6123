"""GPU: fused quantize-in-gather + D2H, and H2D + dequantize-in-scatter, vs pinned memcpy of raw KV.

Llama-3-8B KV geometry (32 layers, 8 KV heads, head_dim 128, bf16), vLLM flash layout with
16-token blocks in shuffled order, 32k tokens, 256-token chunks. Throughput is counted in raw
bf16 bytes delivered per second (4 GiB at 32k tokens), so a codec that halves the PCIe bytes can
beat memcpy. Run: ``PYTHONPATH=src python benchmarks/bench_kv_codec_gpu.py [--tokens 32768]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvtier.transfer.kernels.quant_kernels import gather_quant, scatter_dequant


def timed(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--codecs", default="fp8,int8,int4,int2")
    a = ap.parse_args()
    layers, heads, dim, bs, ct = 32, 8, 128, 16, 256
    nb = a.tokens // bs + 8
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [
        torch.randn(2, nb, bs, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(layers)
    ]
    blocks = torch.randperm(nb, device="cuda", generator=g)[: a.tokens // bs]
    slots = (blocks[:, None] * bs + torch.arange(bs, device="cuda")).reshape(-1)
    raw_bytes = layers * 2 * a.tokens * heads * dim * 2
    dev_raw = torch.empty(raw_bytes, dtype=torch.uint8, device="cuda")
    host_raw = torch.empty(raw_bytes, dtype=torch.uint8, pin_memory=True)
    gb = raw_bytes / 1e9
    d2h = timed(lambda: host_raw.copy_(dev_raw, non_blocking=True), a.reps)
    h2d = timed(lambda: dev_raw.copy_(host_raw, non_blocking=True), a.reps)
    print(f"raw KV {gb:.2f} GB; pinned memcpy D2H {gb / d2h:.1f} GB/s, H2D {gb / h2d:.1f} GB/s")
    print(
        "codec  ratio  kernel-gather GB/s  store(gather+D2H) GB/s  x memcpy  load(H2D+scatter) GB/s  x memcpy"
        "  torch-path store GB/s"
    )
    for name in a.codecs.split(","):
        try:
            run_codec(name, caches, slots, ct, raw_bytes, d2h, h2d, a.reps)
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")


def run_codec(
    name: str,
    caches: list[torch.Tensor],
    slots: torch.Tensor,
    ct: int,
    raw_bytes: int,
    d2h: float,
    h2d: float,
    reps: int,
) -> None:
    gb = raw_bytes / 1e9
    a = argparse.Namespace(reps=reps)
    if True:
        packed = gather_quant(caches, slots, name, ct)
        host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
        dev_in = torch.empty_like(packed)
        t_kernel = timed(lambda: gather_quant(caches, slots, name, ct), a.reps)
        t_store = timed(lambda: host.copy_(gather_quant(caches, slots, name, ct), non_blocking=True), a.reps)

        def load() -> None:
            dev_in.copy_(host, non_blocking=True)
            scatter_dequant(dev_in, caches, slots, name, ct)

        t_load = timed(load, a.reps)
        t_torch = timed(lambda: gather_quant(caches, slots, name, ct, backend="torch"), 1)
        ratio = packed.numel() / raw_bytes
        print(
            f"{name:6} {ratio:.3f}  {gb / t_kernel:17.1f}  {gb / t_store:22.1f}  {d2h / t_store:8.2f}"
            f"  {gb / t_load:22.1f}  {h2d / t_load:8.2f}  {gb / t_torch:20.1f}"
        )
        del packed, host, dev_in


if __name__ == "__main__":
    main()
