"""One SGLang rank in its own process: write pages to, or read them from, a kvtier disk tier.

``python other_process.py write|read DISK_DIR LAYOUT``; prints ``ok N`` (pages set, or pages
read back bit-exactly). The parent varies ``PYTHONHASHSEED`` so keys must not depend on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pools import PAGE, fill_random, page_keys, pool, storage_config
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

N = 4


def main(role: str, disk: str, layout: str) -> None:
    cfg = Path(disk) / "kvtier.yaml"
    cfg.write_text(
        f"cpu:\n  pin_memory: 'no'\ndisk:\n  enabled: true\n  path: {disk}/tier\n  durability: always\n"
    )
    p = pool("mha", layout)
    b = StorageBackendFactory.create_backend("dynamic", storage_config({"kvtier_config": str(cfg)}), p)
    b.register_mem_pool_host(p)
    keys = page_keys(N, "cross-process")
    if role == "write":
        idx = fill_random(p, N, seed=11)
        print("ok", sum(b.batch_set_v1(keys, idx)))
    else:
        ref = pool("mha", "page_first")
        want = [ref.get_data_page(int(i), flat=False).clone() for i in fill_random(ref, N, seed=11)[::PAGE]]
        assert b.batch_exists(keys) == N, "reader sees fewer pages than the writer stored"
        out = p.alloc(N * PAGE)
        assert out is not None and b.batch_get_v1(keys, out) == [True] * N
        # Compare in kvtier's layout: the writer and reader may use different pool layouts.
        from kvtier.integrations.sglang_pages import describe_pool

        lay_w, lay_r = describe_pool(ref), describe_pool(p)
        same = all(
            torch.equal(lay_w.view(w), lay_r.view(p.get_data_page(int(i), flat=False)))
            for w, i in zip(want, out[::PAGE].tolist())
        )
        print("ok", N if same else 0)
    b.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
