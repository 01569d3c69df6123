"""PD KV hand-off on one host: the transfer channel (CUDA IPC) vs NCCL send/recv vs the host path.

Two processes: rank 0 the producer (prefill GPU), rank 1 the consumer (decode GPU). Same run,
same bytes, medians of ``--repeat`` after a warm-up:

* ``channel``: the producer offers the KV as chunk views of one device buffer
  (``ChannelServer.offer``), the consumer fetches them (``ChannelClient.fetch``: map the CUDA IPC
  handle, copy device to device into its own buffer). Timed on the consumer, fetch to synchronize.
* ``nccl``: ``torch.distributed`` NCCL ``send``/``recv`` of the same bytes (one message, and one
  per chunk), timed on the consumer. Needs two GPUs (NCCL refuses two ranks on one device).
* ``host path``: the tier path PD uses without the channel: the producer stores the KV from its
  GPU into the kvtier daemon (shared memory), the consumer retrieves it into its GPU. The
  decode-side wait is the retrieve (after the producer's store).

Workload: a ``--tokens`` (default 32768) Llama-3-8B-shaped KV (32 layers, 8 KV heads, head_dim
128, bf16: 128 KiB/token, 4 GiB at 32k) in ``--chunk-tokens`` chunks. Goal (issue 20): channel
GB/s >= 0.8x NCCL's.

Run on a 2-GPU host: ``python benchmarks/bench_pd_channel.py``; on one GPU
``--single-gpu`` runs both ranks on cuda:0 (no NCCL row). NVLink multicast stays off
(``NCCL_NVLS_ENABLE=0`` and friends are set here, for the children too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kvtier import CacheEngine, Config  # noqa: E402
from kvtier.transfer.channel import ChannelClient, ChannelServer  # noqa: E402

# NVLink multicast off before NCCL starts (spawned ranks import this module again)
for _k, _v in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ[_k] = _v

L, H, D = 32, 8, 128


def chunk_key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def engine(url: str, chunk_tokens: int) -> CacheEngine:
    cfg = Config.load(
        env={}, chunk_tokens=chunk_tokens, cpu__enabled=False, remote__url=url, remote__timeout_s=120.0
    )
    eng = CacheEngine(cfg)
    eng.bind_model(L, H, D, torch.bfloat16, model_id="bench-pd-channel")
    return eng


def worker(rank: int, args: argparse.Namespace, sock: str, url: str, out_file: str) -> None:
    dev = torch.device("cuda", 0 if args.single_gpu else rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("gloo", init_method=f"file://{sock}.pg", rank=rank, world_size=2)
    nccl = None if args.single_gpu else dist.new_group([0, 1], backend="nccl")
    T, C = args.tokens, args.chunk_tokens
    n_chunks = T // C
    kv = torch.empty(L, 2, T, H, D, dtype=torch.bfloat16, device=dev)
    nbytes = kv.numel() * kv.element_size()
    res: dict[str, list[float]] = {}

    def rec(name: str, seconds: float) -> None:
        res.setdefault(name, []).append(seconds)

    tokens = list(range(T))
    if rank == 0:  # producer
        kv.normal_()
        server = ChannelServer(sock, max_bytes=2 * nbytes).start()
        for i in range(n_chunks):
            assert server.offer(chunk_key(i), kv[:, :, i * C : (i + 1) * C])
    dist.barrier()
    client = ChannelClient(sock, dev, timeout_s=120) if rank == 1 else None
    for rep in range(args.repeat + 1):
        dist.barrier()
        if client is not None:  # channel: consumer pulls every chunk
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()

            def put(i: int, t: torch.Tensor) -> None:
                kv[:, :, i * C : (i + 1) * C].copy_(t, non_blocking=True)

            got = client.fetch([chunk_key(i) for i in range(n_chunks)], put)
            torch.cuda.synchronize(dev)
            if rep:
                rec("channel", time.perf_counter() - t0)
            assert got == n_chunks, client.stats
        dist.barrier()
        if nccl is not None:
            for name, parts in (("nccl", 1), ("nccl per chunk", n_chunks)):
                flat = kv.view(-1)
                step = flat.numel() // parts
                dist.barrier()
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for p in range(parts):
                    piece = flat[p * step : (p + 1) * step]
                    if rank == 0:
                        dist.send(piece, 1, group=nccl)
                    else:
                        dist.recv(piece, 0, group=nccl)
                torch.cuda.synchronize(dev)
                if rep and rank == 1:
                    rec(name, time.perf_counter() - t0)
        if url and not args.no_host_path:
            eng = engine(url, C)
            toks = [t + 1_000_000 * rep for t in tokens]
            dist.barrier()
            if rank == 0:
                t0 = time.perf_counter()
                assert eng.store(toks, kv) == T
                store_s = time.perf_counter() - t0
                eng.flush(timeout_s=120)
            dist.barrier()
            if rank == 1:
                t0 = time.perf_counter()
                r = eng.retrieve(toks, out=kv)
                if rep:
                    rec("host path retrieve", time.perf_counter() - t0)
                assert r.num_tokens == T
            obj: list[Any] = [store_s if rank == 0 else None]
            dist.broadcast_object_list(obj, src=0)
            if rep and rank == 1:
                rec("host path store", float(obj[0]))
            dist.barrier()
            if rank == 0:
                for k in eng.keys(toks):
                    eng.storage.remove(k.digest)
            eng.close()
    dist.barrier()
    if rank == 1:
        Path(out_file).write_text(json.dumps({"seconds": res, "bytes": nbytes}))
        assert client is not None
        client.close()
    else:
        server.close()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--single-gpu", action="store_true", help="both ranks on cuda:0 (no NCCL row)")
    ap.add_argument("--no-host-path", action="store_true", help="skip the daemon (tier) path")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if not args.single_gpu and torch.cuda.device_count() < 2:
        raise SystemExit("bench_pd_channel: needs 2 GPUs (or --single-gpu)")
    d = Path(tempfile.mkdtemp(prefix="kvtier-pdch-"))
    sock, out = str(d / "ch.sock"), str(d / "out.json")
    nbytes = L * 2 * args.tokens * H * D * 2
    daemon = None
    url = ""
    if not args.no_host_path:
        from kvtier.server.process import DaemonProcess

        pool = f"{(nbytes * 5 // 4) >> 20}MiB"
        daemon = DaemonProcess("--cpu-size", pool, "--chunk-tokens", str(args.chunk_tokens)).start(
            timeout_s=300
        )
        url = daemon.url
    try:
        mp.spawn(worker, args=(args, sock, url, out), nprocs=2, join=True)
    finally:
        if daemon is not None:
            daemon.terminate(60)
    r = json.loads(Path(out).read_text())
    med = {k: statistics.median(v) for k, v in r["seconds"].items()}
    gbps = {k: r["bytes"] / s / 1e9 for k, s in med.items() if k != "host path store"}
    name = torch.cuda.get_device_name(0)
    print(
        f"{args.tokens} tokens Llama-3-8B-shaped bf16 KV = {r['bytes'] / 2**30:.2f} GiB, "
        f"{args.chunk_tokens}-token chunks, median of {args.repeat}; {name}"
        f"{' (both ranks on one GPU)' if args.single_gpu else ' x2'}"
    )
    for k, s in med.items():
        extra = f"{gbps[k]:7.1f} GB/s" if k in gbps else ""
        print(f"  {k:<20} {s * 1e3:9.1f} ms {extra}")
    if "nccl" in gbps:
        print(f"  channel / nccl: {gbps['channel'] / gbps['nccl']:.2f}x (goal >= 0.8x)")
    if "host path retrieve" in med:
        print(
            f"  decode-side wait: channel {med['channel'] * 1e3:.1f} ms vs host path retrieve "
            f"{med['host path retrieve'] * 1e3:.1f} ms (+ producer store {med['host path store'] * 1e3:.1f} ms)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"median_s": med, "gbps": gbps, "bytes": r["bytes"]}, indent=1))


if __name__ == "__main__":
    main()
