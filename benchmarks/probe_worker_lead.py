"""Where the vLLM worker's CUDA load spends the host time before its first DMA (issue 21).

``profile_gpu_gaps.py --parts worker`` shows the load call as ~5.8 ms of host time before the
first DMA on the device plus a DMA span at memcpy speed. This probe times the stages of
``WorkerSide.begin_loads`` without the profiler: each wrapped function's host time (calls,
total, first call's start relative to the call), and CUDA events around the first DMA (an
event on the compute stream at the call's start, one on the copy stream after the first 2D
copy is enqueued), so the device-side lead is measured too. Same setup as
``profile_gpu_gaps.worker`` (32k tokens, 32 layers, 8 kv heads x 128, bf16, 256-token chunks).

Run: ``PYTHONPATH=src python3 benchmarks/probe_worker_lead.py [--tokens N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import torch

LAYERS, HEADS, DIM, BS, CT = 32, 8, 128, 16, 256

_T0 = [0.0]
_STATS: dict[str, list[float]] = {}  # name -> [calls, total s, first start s after the call's start]
_FIRST_DMA: list[Any] = []


def _wrap(owner: Any, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            s = _STATS.setdefault(label, [0, 0.0, t - _T0[0]])
            s[0] += 1
            s[1] += time.perf_counter() - t

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--feed-batch", type=int, default=0, help="transfer.grouped.FEED_BATCH (0: as is)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no events, no ring)")
    a = ap.parse_args()

    import kvtier.devcopy2d as d2
    import kvtier.engine as eng_mod
    import kvtier.integrations.vllm_worker as vw
    import kvtier.transfer.grouped as gr
    from kvtier.config import Config
    from kvtier.engine import CacheEngine
    from kvtier.integrations.vllm_plan import TransferSpec
    from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
    from kvtier.keys import Namespace
    from kvtier.transfer.blocks import detect

    n_t = a.tokens
    if a.feed_batch:
        gr.FEED_BATCH = a.feed_batch
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    n_blocks = 2 * (n_t // BS)
    g = torch.Generator().manual_seed(0)
    caches = [
        torch.randn(2, n_blocks, BS, HEADS, DIM, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)
    ]
    table = torch.randperm(n_blocks, generator=g)[: n_t // BS].tolist()
    other = [b for b in range(n_blocks) if b not in set(table)][: n_t // BS]
    nbytes = LAYERS * 2 * n_t * HEADS * DIM * 2
    lay = detect(caches[0], num_kv_heads=HEADS, head_dim=DIM, block_size=BS)
    toks = list(range(n_t))
    cfg = Config.load(env={}, chunk__chunk_tokens=CT, cpu__max_bytes=nbytes * 2 + (256 << 20))
    eng = CacheEngine(cfg, namespace=Namespace("bench", "bfloat16", (LAYERS, HEADS, DIM)))
    w = WorkerSide(eng, lay, LAYERS, ConnectorStats())
    w.begin_saves([TransferSpec("r", toks, 0, n_t, table)], dev)
    for i, c in enumerate(caches):
        w.save_layer(i, c)
    w.finish_saves(dev)
    dst = [torch.zeros_like(c) for c in caches]
    spec = TransferSpec("r", toks, 0, n_t, other)

    # the anchor: one flat pinned memcpy of the same bytes
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    flat = torch.empty(nbytes, dtype=torch.uint8, device=dev)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        flat.copy_(src, non_blocking=True)
    sync()
    t = time.perf_counter()
    flat.copy_(src, non_blocking=True)
    sync()
    anchor = time.perf_counter() - t
    del flat, src

    real_copy = d2.copy_rows

    def first_copy(run: Any, stream: Any, copier: Any) -> None:
        real_copy(run, stream, copier)
        if not _FIRST_DMA and stream is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream)
            _FIRST_DMA.append((time.perf_counter() - _T0[0], ev))

    gr.copy_rows = first_copy  # type: ignore[assignment]
    for owner, name in [
        (WorkerSide, "fence_saves"),
        (WorkerSide, "release_loads"),
        (WorkerSide, "_plan_load"),
        (CacheEngine, "iter_chunks"),
        (CacheEngine, "chunk_ok"),
        (CacheEngine, "keys"),
        (gr.GroupedLoad, "streamed"),
        (gr.GroupedLoad, "_setup"),
        (gr.GroupedLoad, "_buffer"),
        (gr.GroupedLoad, "feed"),
        (gr.GroupedLoad, "_flush"),
        (gr.GroupedLoad, "attach"),
        (gr.GroupedLoad, "_issue_free"),
        (vw, "token_index"),
        (gr, "copy_rows"),
        (eng_mod.CacheEngine, "open_chunk"),
    ]:
        _wrap(owner, name, f"{getattr(owner, '__name__', owner)}.{name}")

    print(f"anchor: flat pinned H2D of {nbytes >> 20} MiB {anchor * 1e3:.2f} ms")
    for r in range(a.repeats + 1):
        w.release_loads()
        sync()
        _STATS.clear()
        _FIRST_DMA.clear()
        e0 = torch.cuda.Event(enable_timing=True) if cuda else None
        e1 = torch.cuda.Event(enable_timing=True) if cuda else None
        _T0[0] = time.perf_counter()
        if e0 is not None:
            e0.record()
        w.begin_loads([spec], dev)
        tb = time.perf_counter() - _T0[0]
        for i, c in enumerate(dst):
            w.load_layer(i, c)
        if e1 is not None:
            e1.record()
        sync()
        total = time.perf_counter() - _T0[0]
        if r == 0:
            continue  # warm-up
        lead_dev = e0.elapsed_time(_FIRST_DMA[0][1]) if _FIRST_DMA and e0 is not None else float("nan")
        first_at = _FIRST_DMA[0][0] * 1e3 if _FIRST_DMA else float("nan")
        dev_call = e0.elapsed_time(e1) if e0 is not None and e1 is not None else float("nan")
        print(
            f"run {r}: call {total * 1e3:.2f} ms ({anchor / total:.3f}x anchor), begin_loads host "
            f"{tb * 1e3:.2f} ms, first 2D copy enqueued at +{first_at:.2f} ms, "
            f"done on the device at +{lead_dev:.2f} ms, device call {dev_call:.2f} ms"
        )
        for name, (n, tot, first) in sorted(_STATS.items(), key=lambda kv: kv[1][2]):
            print(
                f"    {name:36s} calls {int(n):4d}  total {tot * 1e3:7.3f} ms  first at +{first * 1e3:6.2f} ms"
            )
    eng.close()


if __name__ == "__main__":
    main()
