"""batch_set / batch_exists / batch_get of SGLang host-pool pages: kvtier vs SGLang's HiCacheFile.

Same real ``MHATokenToKVPoolHost`` pages, same run. kvtier through the zero-copy v1 path
(``interface_v1``) on its CPU tier and on its disk tier; HiCacheFile through SGLang's generic
path (flat page copies), as SGLang's controller drives each. Run in ``.venv-sglang``:
``.venv-sglang/bin/python benchmarks/bench_sglang.py [--pages N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_hash_str

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.sglang import KVTierHiCacheStorage

L, H, D, PAGE = 8, 8, 128, 64


def make_pool(n_pages: int) -> MHATokenToKVPoolHost:
    k = tuple(torch.zeros(8, H, D, dtype=torch.bfloat16) for _ in range(L))
    v = tuple(torch.zeros(8, H, D, dtype=torch.bfloat16) for _ in range(L))
    ptr = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)  # noqa: E731
    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=ptr(k), v_data_ptrs=ptr(v), layout=KVBufferLayout.NHD),
        page_size=PAGE,
        head_num=H,
        head_dim=D,
        v_head_dim=D,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )
    return MHATokenToKVPoolHost(
        info,
        1.0,
        0,
        PAGE,
        "page_first",
        pin_memory=False,
        device="cpu",
        device_capacity_tokens=8,
        start_layer=0,
        end_layer=L,
        host_token_capacity=2 * n_pages * PAGE,
    )


def cfg(extra: dict) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(0, 1, 0, 1, 0, 1, False, False, False, "bench/model", extra_config=extra)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=64)
    n = ap.parse_args().pages
    pool = make_pool(n)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape).to(torch.bfloat16))
    src, dst = pool.alloc(n * PAGE), pool.alloc(n * PAGE)
    keys, prior = [], None
    for i in range(n):
        prior = get_hash_str(list(range(i * PAGE, (i + 1) * PAGE)), prior)
        keys.append(prior)
    gb = n * pool.get_size_per_token() * PAGE / 1e9
    print(
        f"{n} pages of {pool.get_size_per_token() * PAGE / 1e6:.1f} MB ({gb:.2f} GB), {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        backends = {
            "kvtier cpu (v1)": KVTierHiCacheStorage(
                cfg({}),
                {},
                engine=CacheEngine(
                    Config.from_dict({"cpu": {"max_bytes": int(gb * 1e9 * 1.5), "pin_memory": "no"}})
                ),
            ),
            "kvtier disk (v1)": KVTierHiCacheStorage(
                cfg({}),
                {},
                engine=CacheEngine(
                    Config.from_dict(
                        {
                            "cpu": {"enabled": False},
                            "disk": {"enabled": True, "path": f"{tmp}/kv", "durability": "none"},
                        }
                    )
                ),
            ),
            "HiCacheFile (generic)": HiCacheFile(cfg({"file_storage_path": f"{tmp}/file"})),
        }
        for name, b in backends.items():
            b.register_mem_pool_host(pool)
            v1 = isinstance(b, KVTierHiCacheStorage)
            t0 = time.perf_counter()
            if v1:
                assert all(b.batch_set_v1(keys, src))
            else:
                assert b.batch_set(keys, [pool.get_data_page(int(i)) for i in src[::PAGE]])
            t1 = time.perf_counter()
            assert b.batch_exists(keys) == n
            t2 = time.perf_counter()
            if v1:
                assert all(b.batch_get_v1(keys, dst))
            else:
                got = b.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
                for i, page in zip(dst[::PAGE].tolist(), got):
                    pool.set_from_flat_data_page(i, page)
            t3 = time.perf_counter()
            assert torch.equal(pool.kv_buffer[:, src], pool.kv_buffer[:, dst]), name
            print(
                f"{name:24s} set {gb / (t1 - t0):6.2f} GB/s  exists {1e3 * (t2 - t1):7.2f} ms  get {gb / (t3 - t2):6.2f} GB/s"
            )
            pool.kv_buffer[:, dst] = 0
            if v1:
                b.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
