"""The vLLM worker under a lossy kv_codec: KV is quantized in the gather and dequantized in the
scatter (``transfer.packed_blocks``), and the chunks are the engine's own, byte for byte.

Runs on CPU tensors of vLLM's flash layouts (the torch path of the fused kernels) and, with
``-m gpu``, on CUDA (the Triton kernels): the same assertions hold on both.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.vllm_plan import TransferSpec
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.keys import Namespace
from kvtier.transfer.blocks import detect
from kvtier.transfer.packed_blocks import PackedLoad, PackedSave, packs

L, H, D, BS, NB, CT = 3, 2, 64, 16, 16, 64
BLOCKS = [9, 2, 14, 5, 11, 0, 7, 3, 12, 6]  # 160 tokens' blocks, out of order
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def engine(codec: str) -> CacheEngine:
    cfg = Config.load(
        env={}, chunk__chunk_tokens=CT, chunk__kv_codec=codec, cpu__max_bytes="64MiB", cpu__pin_memory="no"
    )
    return CacheEngine(cfg, namespace=Namespace("m", "bfloat16", (L, H, D), kv_codec=codec))


def caches(device: str, hnd: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if hnd:  # allocated [2, nb, H, bs, D], handed out as an NHD-shaped view
        make = [(torch.randn(2, NB, H, BS, D, generator=g) * 3).transpose(2, 3) for _ in range(L)]
    else:
        make = [torch.randn(2, NB, BS, H, D, generator=g) * 3 for _ in range(L)]
    return [t.to(torch.bfloat16).to(device) for t in make]


def rows(cs: list[torch.Tensor], blocks: list[int], t0: int, t1: int) -> torch.Tensor:
    """``[L, 2, t1 - t0, H, D]`` on the CPU: tokens ``t0..t1`` of a request laid on ``blocks``."""
    slots = torch.tensor([blocks[t // BS] * BS + t % BS for t in range(t0, t1)])
    return torch.stack([c.cpu()[:, slots // BS, slots % BS] for c in cs])


def packed_chunks(eng: CacheEngine, toks: list[int]) -> list[tuple[bytes, bytes]]:
    with eng.retrieve_chunks(toks, decode=False) as v:
        return [(c.fingerprint, c.kv.numpy().tobytes()) for _, c in v.chunks]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec,hnd", [("int8", False), ("int4", True), ("fp8", False)])
def test_worker_moves_packed_chunks_that_are_the_engines_own(device: str, codec: str, hnd: bool) -> None:
    dev = torch.device(device)
    src = caches(device, hnd)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    toks = list(range(500, 660))
    worker_eng, engine_eng = engine(codec), engine(codec)
    assert packs(worker_eng, lay)

    # save through the worker: two whole chunks, quantized in the gather
    stats = ConnectorStats()
    w = WorkerSide(worker_eng, lay, L, stats)
    w.begin_saves([TransferSpec("r", toks, 0, 2 * CT, BLOCKS[:8])], dev)
    assert all(sv.packed is not None for sv in w._saves)
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(dev)
    assert stats.saved_tokens == 2 * CT and stats.store_failures == 0
    # the same KV through the engine's own path: the same chunks, byte for byte
    kv = rows(src, BLOCKS, 0, 2 * CT)
    assert engine_eng.store(toks[: 2 * CT], kv) == 2 * CT
    got, want = packed_chunks(worker_eng, toks), packed_chunks(engine_eng, toks)
    assert len(got) == 2 and got == want
    # and readable through the engine path: the codec's round trip of the cache's rows
    back = worker_eng.retrieve(toks).kv
    assert back is not None and back.shape[2] == 2 * CT
    assert torch.equal(back, engine_eng.retrieve(toks).kv)
    err = (back.float() - kv.float()).abs().max() / kv.float().abs().max()
    assert 0 < err < (0.2 if codec == "int4" else 0.05)

    # a load through the worker of chunks the engine path stored (160 tokens: chunks of 64, 64, 32),
    # from token 16 (a partial first piece) to 144 (a partial last piece), into other blocks
    assert engine_eng.store(toks, rows(src, BLOCKS, 0, 160)) == 160 - 2 * CT
    full = engine_eng.retrieve(toks).kv
    assert full is not None and full.shape[2] == 160
    dst_blocks = [4, 15, 1, 10, 8, 13, 6, 0, 2]
    dst = [torch.zeros_like(c) for c in src]
    w2 = WorkerSide(engine_eng, lay, L, ConnectorStats())
    w2.begin_loads([TransferSpec("r", toks, 16, 144, dst_blocks[1:])], dev)
    ld = w2._loads[0].packed
    assert isinstance(ld, PackedLoad) and len(ld.whole) == 1 and len(ld.head) == len(ld.tail) == 1
    for i, c in enumerate(dst):
        w2.load_layer(i, c)
    if device == "cuda":
        torch.cuda.synchronize()
    assert w2.take_errors() == set() and w2.stats.loaded_tokens == 128
    assert torch.equal(rows(dst, dst_blocks, 16, 144), full[:, :, 16:144])
    assert rows(dst, dst_blocks, 0, 16).abs().sum() == 0  # vLLM's own prefix: not written
    w2.release_loads()


def test_save_that_is_not_whole_chunks_takes_the_raw_path_with_the_same_bytes() -> None:
    src = caches("cpu", False, seed=3)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    toks = list(range(80))
    a, b = engine("int8"), engine("int8")
    w = WorkerSide(a, lay, L, ConnectorStats())
    w.begin_saves([TransferSpec("r", toks, 0, 80, BLOCKS[:5])], torch.device("cpu"))
    assert w._saves[0].packed is None
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(torch.device("cpu"))
    assert b.store(toks, rows(src, BLOCKS, 0, 80)) == 80
    assert packed_chunks(a, toks) == packed_chunks(b, toks) and len(packed_chunks(a, toks)) == 2


def test_packed_save_refuses_a_partial_chunk_and_codec_none_does_not_pack() -> None:
    src = caches("cpu", False)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    assert not packs(engine("none"), lay)
    from kvtier.transfer.blocks import token_index

    idx = token_index(BLOCKS, 0, 0, 80, BS, torch.device("cpu"))
    with pytest.raises(Exception, match="whole chunks"):
        PackedSave(engine("int8"), idx, L, torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_packed_save_refuses_a_chunk_of_nonfinite_kv(device: str, codec: str, bad: float) -> None:
    """The packed save never hands the raw KV to the engine (whose store_range checks it), so a
    NaN/Inf in the cache must reach ``store_packed_range`` as a non-finite scale: that chunk and
    the ones after it are refused and counted, the ones before are stored, nothing fails, and a
    later load of the request is a hit up to the bad chunk only (the rest is recomputed)."""
    dev = torch.device(device)
    src = caches(device, False)
    src[1][1, BLOCKS[5], 7, 1, 9] = bad  # a value of layer 1, token 5 * 16 + 7: chunk 1
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    toks = list(range(500, 660))
    eng = engine(codec)
    stats = ConnectorStats()
    w = WorkerSide(eng, lay, L, stats)
    w.begin_saves([TransferSpec("r", toks, 0, 2 * CT, BLOCKS[:8])], dev)
    assert all(sv.packed is not None for sv in w._saves)
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(dev)
    assert stats.saved_tokens == CT and stats.store_failures == 0
    assert eng.stats().nonfinite_chunks == 1
    back = eng.retrieve(toks).kv
    assert back is not None and back.shape[2] == CT and bool(torch.isfinite(back).all())
