"""Where the GPU paths of issue 21 lose time against memcpy: host gaps around the DMAs.

For each path (vLLM worker load / save, engine store from GPU / retrieve(out=gpu)) one warm
call runs under ``torch.profiler`` and the trace is reduced to: host time from the call's start
to the first DMA on the device, the DMA span (first DMA start .. last DMA end), the sum of DMA
durations, the idle gaps between DMAs (count, total, largest) and the tail (last DMA end ..
the call's end). A perfect path has lead ~0, gaps ~0, tail ~0 and DMAs at memcpy speed. Also a
``cProfile`` of the call's host side (top entries by cumulative time). Traces go to ``--out``.
The profiler slows the host side: the worker load's lead reads ~5.8 ms here and 1.3 ms without
it (``probe_worker_lead.py``, H200, session 9); use that probe for host-side stage times.

Run: ``PYTHONPATH=src python3 benchmarks/profile_gpu_gaps.py [--tokens N] [--parts worker,engine,quant,hf]
[--out DIR]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import pstats
import time
from collections.abc import Callable
from typing import Any

import torch

LAYERS, HEADS, DIM, BS, CT = 32, 8, 128, 16, 256


def _summarize(trace_path: str, what: str) -> dict[str, float]:
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    marks = [e for e in ev if e.get("name") == "kvtier_call" and e.get("ph") == "X"]
    mem = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in ev
        if e.get("cat") == "gpu_memcpy" and e.get("ph") == "X" and float(e.get("dur", 0)) > 5
    )
    kern = [e for e in ev if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not marks or not mem:
        print(f"--- {what}: no marks/memcpys in the trace")
        return {}
    t0 = float(marks[0]["ts"])
    t1 = t0 + float(marks[0]["dur"])
    gaps = [b0 - a1 for (_, a1), (b0, _) in itertools.pairwise(mem) if b0 > a1]
    dev_end = max([m[1] for m in mem] + [float(k["ts"]) + float(k.get("dur", 0)) for k in kern])
    out = {
        "call_ms": (t1 - t0) / 1e3,
        "lead_ms": (mem[0][0] - t0) / 1e3,
        "dma_span_ms": (mem[-1][1] - mem[0][0]) / 1e3,
        "dma_sum_ms": sum(b - a for a, b in mem) / 1e3,
        "dmas": len(mem),
        "gaps_ms": sum(gaps) / 1e3,
        "gaps_over_20us": sum(1 for g in gaps if g > 20),
        "max_gap_ms": max(gaps, default=0) / 1e3,
        "tail_after_last_dma_ms": (t1 - mem[-1][1]) / 1e3,
        "device_tail_ms": (dev_end - mem[-1][1]) / 1e3,
        "kernels": len(kern),
        "kernel_sum_ms": sum(float(k.get("dur", 0)) for k in kern) / 1e3,
    }
    print(
        f"--- {what}: "
        + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())
    )
    # where the big gaps are: the CPU ops running during the 3 largest gaps
    big = sorted(
        ((b0 - a1, a1, b0) for (_, a1), (b0, _) in itertools.pairwise(mem) if b0 - a1 > 100), reverse=True
    )[:3]
    big.insert(0, (mem[0][0] - t0, t0, mem[0][0]))  # the lead: what the host did before the first DMA
    cpu = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function")]
    for g, a1, b0 in big:
        names: dict[str, float] = {}
        for e in cpu:
            s, d = float(e["ts"]), float(e.get("dur", 0))
            ov = min(s + d, b0) - max(s, a1)
            if ov > 0 and d < (t1 - t0) * 0.5:  # not the call mark itself
                names[e["name"]] = names.get(e["name"], 0.0) + ov
        top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
        print(
            f"    gap {g / 1e3:.2f} ms at +{(a1 - t0) / 1e3:.1f} ms: "
            + "; ".join(f"{n[:50]} {v / 1e3:.2f}" for n, v in top)
        )
    return out


def profile_call(
    what: str, fn: Callable[[], object], out_dir: str, setup: Callable[[], object] | None = None
) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile, record_function

    if setup:
        setup()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=acts) as prof, record_function("kvtier_call"):
        fn()
    path = os.path.join(out_dir, f"trace_{what.replace(' ', '_')}.json")
    prof.export_chrome_trace(path)
    res = _summarize(path, what)
    if setup:
        setup()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    pr.disable()
    dt = time.perf_counter() - t0
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(18)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()][4:26]
    print(f"    cProfile ({dt * 1e3:.1f} ms):\n      " + "\n      ".join(lines))
    return res


def worker(n_t: int, out_dir: str) -> dict[str, Any]:
    from kvtier.config import Config
    from kvtier.engine import CacheEngine
    from kvtier.integrations.vllm_plan import TransferSpec
    from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
    from kvtier.keys import Namespace
    from kvtier.transfer.blocks import detect

    dev = torch.device("cuda")
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
    res: dict[str, Any] = {}
    w = WorkerSide(eng, lay, LAYERS, ConnectorStats())
    rnd = [0]

    def save() -> None:
        rnd[0] += 1
        t = [x + rnd[0] * n_t for x in toks]  # fresh tokens: nothing cached yet
        w.begin_saves([TransferSpec("r", t, 0, n_t, table)], dev)
        for i, c in enumerate(caches):
            w.save_layer(i, c)
        w.finish_saves(dev)
        eng.storage.tiers[0].clear()  # type: ignore[attr-defined]

    save()
    res["worker_save"] = profile_call("worker save", save, out_dir)
    # the save's lead: host time of begin_saves and the first layer's gather, by function
    rnd[0] += 1
    t = [x + rnd[0] * n_t for x in toks]
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    w.begin_saves([TransferSpec("r", t, 0, n_t, table)], dev)
    t1 = time.perf_counter()
    w.save_layer(0, caches[0])
    pr.disable()
    t2 = time.perf_counter()
    for i, c in enumerate(caches[1:], 1):
        w.save_layer(i, c)
    w.finish_saves(dev)
    eng.storage.tiers[0].clear()  # type: ignore[attr-defined]
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
    lines = [ln for ln in s.getvalue().splitlines() if ln.strip()][4:20]
    print(
        f"    begin_saves host {(t1 - t0) * 1e3:.2f} ms, first save_layer {(t2 - t1) * 1e3:.2f} ms (cProfile on):"
    )
    print("      " + "\n      ".join(lines))
    w.begin_saves([TransferSpec("r", toks, 0, n_t, table)], dev)
    for i, c in enumerate(caches):
        w.save_layer(i, c)
    w.finish_saves(dev)
    dst = [torch.zeros_like(c) for c in caches]
    spec = TransferSpec("r", toks, 0, n_t, other)

    def load() -> None:
        w.begin_loads([spec], dev)
        for i, c in enumerate(dst):
            w.load_layer(i, c)
        torch.cuda.synchronize()

    load()
    w.release_loads()
    res["worker_load"] = profile_call("worker load", load, out_dir, setup=w.release_loads)
    w.release_loads()
    t0 = time.perf_counter()
    w.begin_loads([spec], dev)
    print(f"    begin_loads host {(time.perf_counter() - t0) * 1e3:.2f} ms")
    w.release_loads()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    w.begin_loads([spec], dev)
    pr.disable()
    w.release_loads()
    for order in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(order).print_stats(16)
        lines = [ln for ln in s.getvalue().splitlines() if ln.strip()][4:22]
        print(f"    begin_loads by {order}:\n      " + "\n      ".join(lines))
    eng.close()
    return res


def engine(n_t: int, out_dir: str) -> dict[str, Any]:
    from kvtier.config import Config
    from kvtier.engine import CacheEngine
    from kvtier.keys import Namespace

    dev = torch.device("cuda")
    kv = torch.randn((LAYERS, 2, n_t, HEADS, DIM), device=dev, dtype=torch.bfloat16)
    nbytes = kv.numel() * 2
    tokens = torch.arange(n_t)
    cfg = Config.load(env={}, chunk__chunk_tokens=CT, cpu__max_bytes=nbytes + (256 << 20))
    eng = CacheEngine(cfg, namespace=Namespace("bench", "bfloat16", (LAYERS, HEADS, DIM)))
    top = eng.storage.tiers[0]
    out = torch.empty_like(kv)
    res: dict[str, Any] = {}

    def clear() -> None:
        top.clear()  # type: ignore[attr-defined]

    eng.store(tokens, kv)
    res["engine_store"] = profile_call(
        "engine store", lambda: (eng.store(tokens, kv), torch.cuda.synchronize()), out_dir, setup=clear
    )
    eng.store(tokens, kv)
    eng.retrieve(tokens, out=out)
    res["engine_retrieve"] = profile_call(
        "engine retrieve", lambda: (eng.retrieve(tokens, out=out), torch.cuda.synchronize()), out_dir
    )
    eng.close()
    return res


def quant(n_t: int, out_dir: str) -> dict[str, Any]:
    """int4 overlapped store/load (``quant_pipeline``): the same trace summary, plus the host
    time of one group's ``gather_quant`` enqueue (if it is near a group's DMA time the host,
    not the copy engine, sets the pace)."""
    from kvtier.transfer.kernels.quant_kernels import gather_quant
    from kvtier.transfer.kernels.quant_pipeline import load_overlapped, store_overlapped

    nb = n_t // BS + 8
    g = torch.Generator(device="cuda").manual_seed(0)
    caches = [
        torch.randn(2, nb, BS, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(LAYERS)
    ]
    blocks = torch.randperm(nb, device="cuda", generator=g)[: n_t // BS]
    slots = (blocks[:, None] * BS + torch.arange(BS, device="cuda")).reshape(-1)
    packed = gather_quant(caches, slots, "int4", CT)
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
    res: dict[str, Any] = {}
    for groups in (16, 4):
        n = n_t // groups
        sub = torch.empty((n // CT, int(packed.shape[1])), dtype=torch.uint8, device="cuda")
        gather_quant(caches, slots[:n], "int4", CT, out=sub)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gather_quant(caches, slots[:n], "int4", CT, out=sub)
        t_host = time.perf_counter() - t0
        torch.cuda.synchronize()
        t_all = time.perf_counter() - t0
        print(
            f"    gather_quant of 1/{groups}: host enqueue {t_host * 1e3:.2f} ms, with the kernels {t_all * 1e3:.2f} ms"
        )
        store_overlapped(caches, slots, "int4", CT, host, groups=groups)
        res[f"int4_store_g{groups}"] = profile_call(
            f"int4 store_overlapped g{groups}",
            lambda groups=groups: (
                store_overlapped(caches, slots, "int4", CT, host, groups=groups),
                torch.cuda.synchronize(),
            ),
            out_dir,
        )
        res[f"int4_load_g{groups}"] = profile_call(
            f"int4 load_overlapped g{groups}",
            lambda groups=groups: (
                load_overlapped(host, caches, slots, "int4", CT, groups=groups),
                torch.cuda.synchronize(),
            ),
            out_dir,
        )
    return res


def hf(n_t: int, out_dir: str) -> dict[str, Any]:
    """The transformers 32k full hit (random Llama-3-8B, bf16): one 2D DMA per layer group and one
    DMA per chunk; ``tail_after_last_dma_ms`` is the compute left once the KV is on the GPU."""
    from kvtier.config import Config
    from kvtier.engine import CacheEngine
    from kvtier.integrations.transformers import prefill
    from kvtier.models import load_model
    from kvtier.transfer.layerwise import ChunkedLayerwiseKV

    loaded = load_model("random:llama-3-8b", device="cuda")
    model, mid = loaded.model, loaded.model_id
    ids = torch.randint(0, int(model.config.vocab_size), (1, n_t), generator=torch.Generator().manual_seed(3))
    ids = ids.cuda()
    eng = CacheEngine(Config.load(env={}, chunk_tokens=CT, cpu__max_bytes="9GiB"))
    prefill(model, ids, eng, model_id=mid)  # the miss: prefill + store
    res: dict[str, Any] = {}
    for rows2d in (True, False):
        ChunkedLayerwiseKV.ROWS2D = rows2d
        for _ in range(2):
            prefill(model, ids, eng, model_id=mid, store=False)
        name = f"hf hit {'2D per group' if rows2d else 'DMA per chunk'}"
        res[name] = profile_call(
            name,
            lambda: (prefill(model, ids, eng, model_id=mid, store=False), torch.cuda.synchronize()),
            out_dir,
        )
    ChunkedLayerwiseKV.ROWS2D = True
    eng.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--parts", default="worker,engine")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    allres: dict[str, Any] = {}
    for p in a.parts.split(","):
        allres.update({"worker": worker, "engine": engine, "quant": quant, "hf": hf}[p](a.tokens, a.out))
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "gaps.json"), "w") as f:
        json.dump(allres, f, indent=1)


if __name__ == "__main__":
    main()
