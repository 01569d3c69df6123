"""Retrieve into GPU memory from the daemon's shared pool, page-locked (``cudaHostRegister``) or
not, next to the in-process pinned CPU tier. Needs CUDA. Run: ``python benchmarks/bench_server_gpu.py``."""

from __future__ import annotations

import statistics
import time

import torch

from kvtier import CacheEngine, Config
from kvtier.server.process import DaemonProcess
from kvtier.wire.shm import SharedSegment


def main() -> None:
    torch.set_num_threads(1)
    L, H, D, T = 32, 8, 128, 4096
    kv = torch.randn(L, 2, T, H, D).to(torch.bfloat16)
    tokens = torch.arange(T)
    nbytes = kv.numel() * kv.element_size()
    res: dict[str, list[float]] = {}
    real_register = SharedSegment.register_cuda
    with DaemonProcess("--cpu-size", "2GiB") as d:
        for name, over, register in (
            ("in-process cpu (pinned)", {"cpu__max_bytes": "2GiB", "cpu__pin_memory": "yes"}, True),
            ("daemon shm, registered", {"cpu__enabled": False, "remote__url": d.url}, True),
            ("daemon shm, pageable", {"cpu__enabled": False, "remote__url": d.url}, False),
        ):
            SharedSegment.register_cuda = real_register if register else (lambda self: False)  # type: ignore[method-assign]
            eng = CacheEngine(
                Config.load(env={}, chunk_tokens=256, model__model_id="g", remote__timeout_s=60, **over)
            )
            eng.bind_model(L, H, D, torch.bfloat16)
            eng.store(tokens, kv)
            times = []
            for _ in range(6):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = eng.retrieve(tokens, device="cuda")
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                assert r.num_tokens == T and r.kv is not None
            assert torch.equal(r.kv.cpu(), kv)
            res[name] = [nbytes / t / 1e9 for t in times[1:]]
            for k in eng.keys(tokens):
                eng.storage.remove(k.digest)
            eng.close()
    print(f"retrieve to GPU, {nbytes / 2**20:.0f} MiB per op, median of 5:")
    for name, v in res.items():
        print(f"  {name:<26} {statistics.median(v):6.2f} GB/s")


if __name__ == "__main__":
    main()
