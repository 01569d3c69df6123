"""Disk-tier benchmark (issue 5): DiskTier write/read GB/s of Llama-3-8B-shaped 256-token chunks
versus raw sequential file write/read of the same bytes, measured side by side in one run, and
retrieve after prefetch versus retrieve from the CPU tier.

Chunk: [32 layers, 2, 256 tokens, 8 kv heads, 128] bf16 = 32 MiB. Cold reads: after an fsync,
every file's pages are dropped with ``posix_fadvise(DONTNEED)`` (per file, so other users of the
machine keep their cache) and ``fincore`` reports how much stayed resident, so the report says
honestly whether a read came from the device or the page cache.

Run: ``python benchmarks/bench_disk.py [--dir DIR] [--total-mib 1024] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.serde.base import tensor_bytes
from kvtier.tiers.disk import DiskTier

SHAPE = (32, 2, 256, 8, 128)
GIB = 1024**3


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int | None:
    """Page-cache bytes of ``files`` per ``fincore`` (None if the tool is missing)."""
    if not files or shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "-b", "-n", "-o", "RES", *map(str, files)], capture_output=True, text=True
    )
    return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else None


def write_all(fd: int, mv: memoryview) -> None:
    while mv:
        mv = mv[os.write(fd, mv) :]


def raw_write(paths: list[Path], srcs: list[torch.Tensor]) -> None:
    for i, p in enumerate(paths):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, tensor_bytes(srcs[i % len(srcs)]))
        finally:
            os.close(fd)


def raw_sync(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(paths[0].parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def raw_read(paths: list[Path], buf: torch.Tensor | None) -> None:
    for p in paths:
        out = buf if buf is not None else torch.empty(SHAPE, dtype=torch.bfloat16)
        mv = tensor_bytes(out)
        with open(p, "rb", buffering=0) as f:
            n = f.readinto(mv)
        assert n == len(mv)


def get_all(tier: DiskTier, keys: list[bytes]) -> None:
    """Read every chunk, releasing each as a consumer does once it has copied it."""
    for k in keys:
        c = tier.get(k)
        assert c is not None
        c.release()


def batched_get_all(tier: DiskTier, keys: list[bytes]) -> None:
    for c in tier.batched_get(keys):
        assert c is not None
        c.release()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def disk_vs_raw(root: Path, n: int, rounds: int, io_threads: int) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(SHAPE, generator=g).to(torch.bfloat16) for _ in range(4)]
    chunks = [Chunk(srcs[i % 4], i.to_bytes(8, "little"), 256) for i in range(n)]
    nbytes = n * srcs[0].numel() * 2
    res: dict[str, list[float]] = {}
    resid: dict[str, list[int]] = {}

    def rec(name: str, seconds: float) -> None:
        res.setdefault(name, []).append(nbytes / seconds / 1e9)

    buf = torch.empty(SHAPE, dtype=torch.bfloat16)

    def one_round(r: int) -> None:
        rawdir, tierdir = root / f"raw{r}", root / f"tier{r}"
        rawdir.mkdir()
        paths = [rawdir / f"{i}.bin" for i in range(n)]
        keys = [os.urandom(16) for _ in range(n)]
        tier = DiskTier(tierdir, 2 * nbytes, io_threads=io_threads)
        tier_files = lambda: sorted(tierdir.glob("??/*.kvc"))  # noqa: E731
        order = ["raw", "tier"] if r % 2 == 0 else ["tier", "raw"]  # alternate who goes first
        for who in order:
            if who == "raw":
                t_buf = timed(lambda: raw_write(paths, srcs))
                t_sync = timed(lambda: raw_sync(paths))
                rec("write raw (page cache)", t_buf)
                rec("write raw + fsync", t_buf + t_sync)
            else:
                t_buf = timed(lambda: [tier.put(k, c) for k, c in zip(keys, chunks)])
                t_sync = timed(tier.sync)
                rec("write tier (page cache)", t_buf)
                rec("write tier + sync", t_buf + t_sync)
        for who in order:
            if who == "raw":
                drop_cache(paths)
                resid.setdefault("raw", []).append(resident_bytes(paths) or 0)
                rec("read raw cold, reused buffer", timed(lambda: raw_read(paths, buf)))
                drop_cache(paths)
                rec("read raw cold, new tensor each", timed(lambda: raw_read(paths, None)))
                rec("read raw warm, reused buffer", timed(lambda: raw_read(paths, buf)))
            else:
                drop_cache(tier_files())
                resid.setdefault("tier", []).append(resident_bytes(tier_files()) or 0)
                rec("read tier cold, get (recycled buffers)", timed(lambda: get_all(tier, keys)))
                drop_cache(tier_files())
                rec(
                    "read tier cold, get_into reused buffer",
                    timed(lambda: [tier.get_into(k, buf) for k in keys]),
                )
                drop_cache(tier_files())
                rec(
                    f"read tier cold, batched_get ({io_threads} threads)",
                    timed(lambda: batched_get_all(tier, keys)),
                )
                rec(
                    "read tier warm, get_into reused buffer",
                    timed(lambda: [tier.get_into(k, buf) for k in keys]),
                )
                rec("read tier warm, get (recycled buffers)", timed(lambda: get_all(tier, keys)))
        tier.close()
        shutil.rmtree(rawdir)
        shutil.rmtree(tierdir)

    for r in range(rounds):
        one_round(r)
    print(f"page-cache bytes resident after DONTNEED (per round): {resid}")
    return res


def prefetch_vs_cpu(root: Path, n: int, rounds: int, device: str) -> dict[str, list[float]]:
    tokens = torch.randint(0, 128000, (256 * n,), generator=torch.Generator().manual_seed(1))
    kv = torch.randn((32, 2, 256 * n, 8, 128), generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    path = root / "engine"

    def engine(promote: bool = True) -> CacheEngine:
        cfg = Config.load(
            env={},
            chunk_tokens=256,
            cpu__max_bytes=f"{n * 33}MiB",
            cpu__pin_memory="auto",
            disk__enabled=True,
            disk__path=str(path),
            disk__max_disk_bytes="8GiB",
            storage__promote_on_hit=promote,
            model__model_id="bench",
            model__kv_dtype="bfloat16",
            model__num_layers=32,
            model__num_kv_heads=8,
            model__head_dim=128,
        )
        return CacheEngine(cfg)

    out: dict[str, list[float]] = {}

    def rec(name: str, s: float) -> None:
        out.setdefault(name, []).append(s * 1e3)

    with engine() as e:
        e.store(tokens, kv)
        assert e.flush(120)
    files = sorted(path.glob("??/*.kvc"))
    for _ in range(rounds):
        with engine(promote=False) as e:  # straight from disk, no promotion
            drop_cache(files)
            rec("retrieve from disk, cold (no prefetch)", timed(lambda: e.retrieve(tokens, device=device)))
            rec(
                "retrieve from disk, page cache (no prefetch)",
                timed(lambda: e.retrieve(tokens, device=device)),
            )
        with engine() as e:
            drop_cache(files)
            t_pf = timed(lambda: e.prefetch(tokens).result(120))
            rec("prefetch, cold disk -> CPU tier (wait for it)", t_pf)
            r = None

            def get() -> None:
                nonlocal r
                r = e.retrieve(tokens, device=device)

            rec("retrieve after prefetch", timed(get))
            assert r is not None and r.num_tokens == 256 * n
            rec("retrieve from CPU tier (again)", timed(get))
        with engine() as e:  # prefetch issued, then the request arrives while it runs
            drop_cache(files)
            rec(
                "prefetch + immediate retrieve (overlapped total)",
                timed(lambda: (e.prefetch(tokens), e.retrieve(tokens, device=device))),
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=None, help="a directory on the disk to test (default: a temp dir)")
    ap.add_argument(
        "--total-mib", type=int, default=1024, help="bytes per pass (default 1024 MiB = 32 chunks)"
    )
    ap.add_argument("--prefetch-chunks", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="where retrieve puts the KV (cpu, cuda)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = max(1, args.total_mib // 32)
    root = Path(tempfile.mkdtemp(prefix="kvtier-bench-disk-", dir=args.dir))
    try:
        print(
            f"dir {root}, {n} chunks of {SHAPE} bf16 = {n * 32} MiB per pass, {args.rounds} rounds, cpus={os.cpu_count()}"
        )
        res = disk_vs_raw(root, n, args.rounds, args.io_threads)
        print("\n| path | GB/s (median) | all rounds |\n|---|---|---|")
        for name, v in res.items():
            print(f"| {name} | {statistics.median(v):.2f} | {' '.join(f'{x:.2f}' for x in v)} |")
        med = {k: statistics.median(v) for k, v in res.items()}
        pairs = [
            ("write, page cache", "write tier (page cache)", "write raw (page cache)"),
            ("write + fsync", "write tier + sync", "write raw + fsync"),
            ("cold read, get", "read tier cold, get (recycled buffers)", "read raw cold, reused buffer"),
            ("cold read, get_into", "read tier cold, get_into reused buffer", "read raw cold, reused buffer"),
            ("warm read, get", "read tier warm, get (recycled buffers)", "read raw warm, reused buffer"),
            ("warm read, get_into", "read tier warm, get_into reused buffer", "read raw warm, reused buffer"),
        ]
        print("\n| tier / raw | ratio |\n|---|---|")
        for label, tier_name, raw_name in pairs:
            print(f"| {label} | {med[tier_name] / med[raw_name]:.2f}x |")
        pf = prefetch_vs_cpu(root, args.prefetch_chunks, args.rounds, args.device)
        print(
            f"\n{args.prefetch_chunks} chunks ({args.prefetch_chunks * 32} MiB) per retrieve, to {args.device}:"
        )
        print("| step | ms (median) | all rounds |\n|---|---|---|")
        for name, v in pf.items():
            print(f"| {name} | {statistics.median(v):.1f} | {' '.join(f'{x:.1f}' for x in v)} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
