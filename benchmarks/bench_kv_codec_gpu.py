"""GPU: fused quantize-in-gather + D2H, and H2D + dequantize-in-scatter, vs pinned memcpy of raw KV.

Llama-3-8B KV geometry (32 layers, 8 KV heads, head_dim 128, bf16), vLLM flash layout with
16-token blocks in shuffled order, 32k tokens, 256-token chunks. Throughput is counted in raw
bf16 bytes delivered per second (4 GiB at 32k tokens), so a codec that halves the PCIe bytes can
beat memcpy. "overlapped" runs the kernels of chunk group g while group g-1 crosses PCIe on a
second stream (``transfer.kernels.quant_pipeline``). ``--worker`` also times the vLLM worker path
(``WorkerSide``: per-layer quantize-in-gather, D2H, CPU tier put; and back) per codec, raw included.
``--groups 4,16`` times the overlapped paths once per group count (one line each).
Run: ``PYTHONPATH=src python benchmarks/bench_kv_codec_gpu.py [--tokens 32768] [--groups 16] [--worker]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvtier.transfer.kernels.quant_kernels import gather_quant, scatter_dequant
from kvtier.transfer.kernels.quant_pipeline import GROUPS, load_overlapped, store_overlapped


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
    ap.add_argument(
        "--groups", default=str(GROUPS), help="comma-separated group counts of the overlapped paths"
    )
    ap.add_argument("--worker", action="store_true")
    ap.add_argument(
        "--kivi-value-tokens", type=int, default=None, help="set quant_triton.KIVI_VALUE_TOKENS (64, 32, 16)"
    )
    a = ap.parse_args()
    if a.kivi_value_tokens is not None:
        from kvtier.transfer.kernels import quant_triton

        quant_triton.KIVI_VALUE_TOKENS = a.kivi_value_tokens
        print(f"KIVI_VALUE_TOKENS = {a.kivi_value_tokens}")
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
        "  torch-path store GB/s | overlapped store GB/s  x memcpy  overlapped load GB/s  x memcpy"
    )
    for name in a.codecs.split(","):
        try:
            run_codec(
                name, caches, slots, ct, raw_bytes, d2h, h2d, a.reps, [int(x) for x in a.groups.split(",")]
            )
        except Exception as e:
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
    if a.worker:
        del dev_raw, host_raw
        print("\nvLLM worker path (WorkerSide, CPU tier 12 GiB pinned), raw bf16 GB/s, same caches")
        print("kv_codec  save (quantize+D2H+tier put) GB/s  x memcpy  load (tier+H2D+scatter) GB/s  x memcpy")
        for name in ["none", "int8", "int4"]:
            try:
                run_worker(name, caches, blocks, bs, ct, a.tokens, raw_bytes, d2h, h2d)
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
    groups_list: list[int],
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
            f"  {gb / t_load:22.1f}  {h2d / t_load:8.2f}  {gb / t_torch:20.1f} |"
        )
        for groups in groups_list:
            # the loads above wrote dequantized KV into the caches: compare with the plain path now
            want = gather_quant(caches, slots, name, ct).cpu()
            t_ostore = timed(
                lambda g=groups: store_overlapped(caches, slots, name, ct, host, groups=g), a.reps
            )
            host.zero_()
            store_overlapped(caches, slots, name, ct, host, groups=groups)
            torch.cuda.synchronize()
            same = torch.equal(host, want)
            t_oload = timed(lambda g=groups: load_overlapped(host, caches, slots, name, ct, groups=g), a.reps)
            print(
                f"{name:6} overlapped, {groups:2} groups: store {gb / t_ostore:6.1f} GB/s"
                f"  {d2h / t_ostore:5.2f}x memcpy  load {gb / t_oload:6.1f} GB/s  {h2d / t_oload:5.2f}x memcpy"
                f"  {'bytes equal' if same else 'BYTES DIFFER'}"
            )
        del packed, host, dev_in


def run_worker(
    name: str,
    caches: list[torch.Tensor],
    blocks: torch.Tensor,
    bs: int,
    ct: int,
    tokens: int,
    raw_bytes: int,
    d2h: float,
    h2d: float,
) -> None:
    """Save ``tokens`` through ``WorkerSide`` (as vLLM's ``save_kv_layer`` calls do), then load them
    back into the same blocks; one engine per codec, the mean of 2 timed rounds."""
    from kvtier.config import Config
    from kvtier.engine import CacheEngine
    from kvtier.integrations.vllm_plan import TransferSpec
    from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
    from kvtier.keys import Namespace
    from kvtier.transfer.blocks import detect

    dev = caches[0].device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    layers, heads, dim = len(caches), int(caches[0].shape[3]), int(caches[0].shape[4])
    lay = detect(caches[0], num_kv_heads=heads, head_dim=dim, block_size=bs)
    reps = 3  # the first is warm-up (kernel compiles, pool page faults); each rep other tokens
    ratio = 1.0 if name == "none" else 0.55
    pool = int(ratio * raw_bytes * reps) + (1 << 30)
    cfg = Config.load(env={}, chunk__chunk_tokens=ct, chunk__kv_codec=name, cpu__max_bytes=str(pool))
    eng = CacheEngine(cfg, namespace=Namespace("bench", "bfloat16", (layers, heads, dim), kv_codec=name))
    w = WorkerSide(eng, lay, layers, ConnectorStats())
    ids = [int(b) for b in blocks.tolist()]
    save_ts, load_ts = [], []
    for rep in range(reps):
        toks = list(range(rep * tokens, (rep + 1) * tokens))
        sync()
        t0 = time.perf_counter()
        w.begin_saves([TransferSpec("r", toks, 0, tokens, ids)], dev)
        for i, c in enumerate(caches):
            w.save_layer(i, c)
        w.finish_saves(dev)
        t1 = time.perf_counter()
        w.begin_loads([TransferSpec("r", toks, 0, tokens, ids)], dev)
        for i, c in enumerate(caches):
            w.load_layer(i, c)
        sync()
        t2 = time.perf_counter()
        w.release_loads()
        if rep:
            save_ts.append(t1 - t0)
            load_ts.append(t2 - t1)
    assert w.stats.saved_tokens == reps * tokens and w.stats.loaded_tokens == reps * tokens, w.stats
    eng.close()
    gb = raw_bytes / 1e9
    ts, tl = statistics.median(save_ts), statistics.median(load_ts)
    print(f"{name:8}  {gb / ts:37.1f}  {d2h / ts:8.2f}  {gb / tl:30.1f}  {h2d / tl:8.2f}")


if __name__ == "__main__":
    main()
