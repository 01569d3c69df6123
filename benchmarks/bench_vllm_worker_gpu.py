"""The vLLM connector's worker save/load on CUDA vs pinned memcpy of the same bytes (issues 13, 21).

vLLM FlashAttention layout (one ``[2, num_blocks, 16, kv_heads, head_dim]`` tensor per layer),
Llama-3-8B KV shape (32 layers, 8 kv heads, head_dim 128, bf16), 32k tokens over a random
block table: 4 GiB each way. Per direction, side by side in one run:

* ``memcpy``: one pinned host<->device copy of the same bytes (the ceiling);
* ``torch``: the worker with per-layer torch indexing (what the connector did before the transfer
  wing: forced here by switching ``transfer.blocks``' kernel path off);
* ``kernels``: the worker as shipped (Triton gather/scatter + the pinned staging ring).

Save = ``save_layer`` for every layer + device sync (the part inside the forward); load =
``load_layer`` for every layer + sync, from chunks already fetched by ``begin_loads`` (pinned
CPU-tier views). Every variant's result is checked bit-exact before it is timed.

Run: ``PYTHONPATH=src python3 benchmarks/bench_vllm_worker_gpu.py [--tokens N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.vllm_plan import TransferSpec
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.keys import Namespace
from kvtier.transfer import blocks
from kvtier.transfer.blocks import detect

LAYERS, HEADS, DIM, BS = 32, 8, 128, 16


def timed(fn: Callable[[], object], reps: int = 5) -> float:
    """Median wall seconds of ``fn`` (which ends with a device sync), after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n_t = args.tokens
    dev = torch.device("cuda")
    n_blocks = 2 * (n_t // BS)
    g = torch.Generator().manual_seed(0)
    caches = [
        torch.randn(2, n_blocks, BS, HEADS, DIM, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)
    ]
    table = torch.randperm(n_blocks, generator=g)[: n_t // BS].tolist()
    used = set(table)
    other = [b for b in range(n_blocks) if b not in used][: n_t // BS]
    nbytes = LAYERS * 2 * n_t * HEADS * DIM * 2
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dflat = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    res: dict[str, float] = {"bytes": nbytes}

    def sync() -> None:
        torch.cuda.synchronize()

    res["memcpy_save_s"] = timed(lambda: (host.copy_(dflat, non_blocking=True), sync()))
    res["memcpy_load_s"] = timed(lambda: (dflat.copy_(host, non_blocking=True), sync()))
    lay = detect(caches[0], num_kv_heads=HEADS, head_dim=DIM, block_size=BS)
    toks = list(range(n_t))
    real_kernel_path = blocks._kernel_path
    save_spec = TransferSpec("r", toks, 0, n_t, table)
    load_spec = TransferSpec("r", toks, 0, n_t, other)
    for variant in ("torch", "kernels"):
        blocks._kernel_path = real_kernel_path if variant == "kernels" else (lambda lay, e: False)  # type: ignore[assignment]
        cfg = Config.load(env={}, chunk__chunk_tokens=256, cpu__max_bytes=nbytes + (256 << 20))
        eng = CacheEngine(cfg, namespace=Namespace("bench", "bfloat16", (LAYERS, HEADS, DIM)))
        w = WorkerSide(eng, lay, LAYERS, ConnectorStats())

        def save(w: WorkerSide = w) -> None:
            w.begin_saves([save_spec], dev)
            for i, c in enumerate(caches):
                w.save_layer(i, c)
            sync()
            w._saves = []  # timing the copy out of the blocks only; the put into the tier is below

        res[f"{variant}_save_s"] = timed(save)
        t0 = time.perf_counter()
        w.begin_saves([save_spec], dev)
        for i, c in enumerate(caches):
            w.save_layer(i, c)
        w.finish_saves(dev)
        res[f"{variant}_finish_saves_s"] = time.perf_counter() - t0
        assert eng.lookup(toks) == n_t
        dst = [torch.zeros_like(c) for c in caches]

        def load(w: WorkerSide = w, dst: list[torch.Tensor] = dst) -> None:
            w.begin_loads([load_spec], dev)
            for i, c in enumerate(dst):
                w.load_layer(i, c)
            sync()

        load()
        for i in range(LAYERS):  # bit-exact: the loaded blocks hold exactly the saved blocks
            assert torch.equal(dst[i][:, other], caches[i][:, table]), f"{variant}: layer {i} differs"
        t_begin = timed(lambda w=w: (w.begin_loads([load_spec], dev), w.release_loads()))
        res[f"{variant}_load_s"] = timed(load) - t_begin
        res[f"{variant}_begin_loads_s"] = t_begin
        w.release_loads()
        eng.close()
        del dst
        print(f"{variant}: bit-exact save/load ok", flush=True)
    blocks._kernel_path = real_kernel_path  # type: ignore[assignment]
    gb = nbytes / 1e9
    for d in ("save", "load"):
        mem = gb / res[f"memcpy_{d}_s"]
        res[f"memcpy_{d}_GBps"] = mem
        for v in ("torch", "kernels"):
            bw = gb / res[f"{v}_{d}_s"]
            res[f"{v}_{d}_GBps"] = bw
            res[f"{v}_{d}_vs_memcpy"] = bw / mem
            print(f"{d:4s} {v:8s} {bw:6.1f} GB/s = {bw / mem:.2f}x pinned memcpy ({mem:.1f} GB/s)")
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
