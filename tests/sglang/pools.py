"""Real SGLang host KV pools on CPU tensors (MHA and MLA, any supported layout) and storage configs.

The pools are SGLang's own ``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``, built from CPU
device buffers the way SGLang's pool assembler describes them (``MHABufferInfo`` /
``MLABufferInfo``); nothing here imitates an SGLang class.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

LAYERS, HEADS, HEAD_DIM, PAGE, DEVICE_TOKENS = 3, 2, 8, 4, 64
MLA_LORA, MLA_ROPE = 8, 4
DTYPE = torch.bfloat16
MODULE = {
    "backend_name": "kvtier",
    "module_path": "kvtier.integrations.sglang",
    "class_name": "KVTierHiCacheStorage",
}


def _ptrs(ts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)


# what both host pools take after their buffer info: host/device size ratio 2.0, no fixed host
# size, the page size and layout; CPU-only, unpinned, all layers
def _host_args(layout: str) -> tuple[float, int, int, str]:
    return 2.0, 0, PAGE, layout


_HOST_KW: dict[str, Any] = {
    "pin_memory": False,
    "device": "cpu",
    "device_capacity_tokens": DEVICE_TOKENS,
    "start_layer": 0,
    "end_layer": LAYERS,
}


def mha_pool(layout: str, v_head_dim: int = HEAD_DIM, dtype: torch.dtype = DTYPE) -> MHATokenToKVPoolHost:
    k = tuple(torch.zeros(DEVICE_TOKENS, HEADS, HEAD_DIM, dtype=dtype) for _ in range(LAYERS))
    v = tuple(torch.zeros(DEVICE_TOKENS, HEADS, v_head_dim, dtype=dtype) for _ in range(LAYERS))
    info = MHABufferInfo(
        buffers=KVBuffers(k=k, v=v, k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v), layout=KVBufferLayout.NHD),
        page_size=PAGE,
        head_num=HEADS,
        head_dim=HEAD_DIM,
        v_head_dim=v_head_dim,
        dtype=dtype,
        device=torch.device("cpu"),
    )
    return MHATokenToKVPoolHost(
        info,
        *_host_args(layout),
        **_HOST_KW,
    )


def mla_pool(layout: str) -> MLATokenToKVPoolHost:
    dim = MLA_LORA + MLA_ROPE
    bufs = tuple(torch.zeros(DEVICE_TOKENS, 1, dim, dtype=DTYPE) for _ in range(LAYERS))
    info = MLABufferInfo(
        buffers=bufs,
        data_ptrs=_ptrs(bufs),
        layer_indices=tuple(range(LAYERS)),
        device_layer_num=LAYERS,
        page_size=PAGE,
        kv_lora_rank=MLA_LORA,
        qk_rope_head_dim=MLA_ROPE,
        kv_cache_dim=dim,
        dtype=DTYPE,
        device=torch.device("cpu"),
    )
    return MLATokenToKVPoolHost(
        info,
        *_host_args(layout),
        **_HOST_KW,
        target_layer_num=LAYERS,
    )


def pool(kind: str, layout: str) -> Any:
    return mha_pool(layout) if kind == "mha" else mla_pool(layout)


def storage_config(
    extra: dict[str, Any],
    *,
    mla: bool = False,
    tp_rank: int = 0,
    tp_size: int = 1,
    model: str = "org/tiny",
    metrics: bool = True,
) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=metrics,
        is_page_first_layout=False,
        model_name=model,
        extra_config={**MODULE, **extra},
    )


def fill_random(p: Any, n_pages: int, seed: int) -> torch.Tensor:
    """Allocate ``n_pages`` pages in pool ``p``, fill its whole buffer with seeded random KV; the slots."""
    g = torch.Generator().manual_seed(seed)
    p.kv_buffer.copy_(torch.randn(p.kv_buffer.shape, generator=g).to(p.kv_buffer.dtype))
    idx = p.alloc(n_pages * PAGE)
    assert idx is not None
    return idx


def pages(p: Any, idx: torch.Tensor) -> list[torch.Tensor]:
    """The pool's own copy of each page (SGLang's ``get_data_page``), to compare bit-exactly."""
    return [p.get_data_page(int(i), flat=True).clone() for i in idx[::PAGE].tolist()]


def page_keys(n: int, tag: str = "") -> list[str]:
    """Page hashes as SGLang computes them (its chained ``get_hash_str`` over each page's token ids)."""
    from sglang.srt.mem_cache.utils import get_hash_str

    base = 1000 + zlib.crc32(tag.encode()) % 100_000
    keys: list[str] = []
    prior: str | None = None
    for i in range(n):
        h = get_hash_str([base + i * PAGE + j for j in range(PAGE)], prior)
        assert isinstance(h, str)
        keys.append(h)
        prior = h
    return keys
