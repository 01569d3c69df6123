"""Load or recompute by measured cost (issue 21.6): the estimate, the decision, and a slow tier
that stops being used. Timings are never asserted: a slowed tier sleeps >= 20 ms per call and
the model's prefill is declared at 1e-5 s/token (or 1 s/token), so every decision has a margin
of orders of magnitude on any machine."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine, Config
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.fault import FaultSpec, FaultTier
from kvtier.tiers.speed import CostEstimate

SLOW = FaultSpec(latency_s=0.02)
# Where a *fast* tier must be judged fast, the model is declared slow (1 ms per token: 16 ms a
# chunk) so that a loaded machine's hiccups in a RAM put or get never reach the recompute cost,
# and the slow tier sleeps 200 ms a call so that it stays well above it.
SLOWER = FaultSpec(latency_s=0.2)
CHUNK = 16


pytestmark = pytest.mark.cost  # the decision itself: cost.enabled at its product default


class CountingTier(CPUTier):
    """A CPU tier that counts the lookups and reads asked of it."""

    def __init__(self) -> None:
        super().__init__(64 * 1024**2, pin_memory=False)
        self.name = "disk"  # stats key distinct from the top tier's
        self.lookups = 0
        self.reads = 0

    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        self.lookups += 1
        return super().prefix_contains(keys)

    def batched_get(self, keys: Sequence[bytes]) -> list:  # type: ignore[type-arg]
        self.reads += 1
        return super().batched_get(keys)

    def get(self, key: bytes):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().get(key)


def _engine(spec: FaultSpec, **cost: object) -> tuple[CacheEngine, CountingTier, FaultTier]:
    cfg = Config.load(env={}, chunk_tokens=CHUNK, cost=dict(cost))
    lower = CountingTier()
    slow = FaultTier(lower, spec)
    top = CPUTier(64 * 1024**2, pin_memory=False)
    return CacheEngine(cfg, tiers=[top, slow]), lower, slow


def _only_below(engine: CacheEngine, tokens: object, first: int = 0) -> None:
    """Drop chunks ``first``.. of ``tokens`` from the top tier: they are then only in the slow one."""
    assert engine.flush(30)
    for k in engine.keys(tokens)[first:]:  # type: ignore[arg-type]
        engine.storage.tiers[0].remove(k.digest)


def test_estimate_separates_latency_from_bandwidth() -> None:
    est = CostEstimate()
    for n in (1e3, 1e6, 4e6, 2e6, 1e5):
        est.observe(n, 0.01 + n / 1e9)  # 10 ms per call, 1 GB/s
    fit = est.fit()
    assert fit is not None and fit.samples == 5
    assert fit.fixed_s == pytest.approx(0.01, rel=1e-6)
    assert fit.per_unit_s == pytest.approx(1e-9, rel=1e-6)


def test_estimate_of_one_size_goes_through_the_origin_and_ignores_junk() -> None:
    est = CostEstimate()
    assert est.fit() is None
    for _ in range(3):
        est.observe(1000, 0.002)
    est.observe(0, 5.0)  # a miss: no bytes
    est.observe(1000, float("nan"))
    fit = est.fit()
    assert fit is not None and fit.samples == 3
    assert fit.fixed_s == 0.0 and fit.seconds(1000) == pytest.approx(0.002)


def test_estimate_follows_a_tier_that_slows_down() -> None:
    est = CostEstimate(half_life=4)
    for _ in range(50):
        est.observe(1000, 0.001)
    for _ in range(12):
        est.observe(1000, 0.1)
    fit = est.fit()
    assert fit is not None and fit.seconds(1000) > 0.08


def test_a_tier_slower_than_recompute_is_neither_asked_nor_loaded() -> None:
    engine, lower, _ = _engine(SLOW)
    tokens = make_tokens(64)
    engine.store(tokens, make_kv(64))  # the write-through puts measure the slow tier (the prior)
    _only_below(engine, tokens)
    engine.note_prefill(1000, 1e-2)  # a fast model: 1e-5 s per token
    asked = lower.lookups
    assert engine.lookup_by_cost(tokens) == 0
    assert lower.lookups == asked  # its lookup is a round trip too: skipped
    s = engine.stats()
    assert s.cost_skipped_tiers == 1 and s.hit_tokens == 0
    assert engine.lookup(tokens) == 64  # the cache still holds it: only the decision changed


def test_the_knob_turns_it_off() -> None:
    engine, _, _ = _engine(SLOW, enabled=False)
    tokens = make_tokens(64)
    engine.store(tokens, make_kv(64))
    _only_below(engine, tokens)
    engine.note_prefill(1000, 1e-2)
    assert engine.lookup_by_cost(tokens) == 64


def test_a_slow_model_loads_even_from_the_slow_tier() -> None:
    engine, _, _ = _engine(SLOW)
    tokens = make_tokens(64)
    engine.store(tokens, make_kv(64))
    _only_below(engine, tokens)
    engine.note_prefill(10, 10.0)  # 1 s per token: any read wins
    assert engine.lookup_by_cost(tokens) == 64
    r = engine.retrieve(tokens[:64])
    assert r.num_tokens == 64


def test_the_fast_part_of_a_prefix_is_loaded_and_the_slow_part_recomputed() -> None:
    engine, _, _ = _engine(SLOWER)
    tokens = make_tokens(64)
    engine.store(tokens, make_kv(64))
    _only_below(engine, tokens, first=2)  # chunks 0, 1 in RAM; 2, 3 only in the slow tier
    engine.note_prefill(1000, 1.0)  # 16 ms a chunk: RAM is far below it, the slow tier far above
    fast = engine.lookup_by_cost(tokens)
    # the top tier was never read yet (unmeasured: tried) or reads in microseconds: both load it
    assert fast == 2 * CHUNK
    assert engine.stats().cost_declined_tokens == 0  # the slow tier was not asked at all


def test_a_tier_that_slows_down_stops_being_used_and_is_probed_again() -> None:
    engine, lower, slow = _engine(FaultSpec(), reprobe_s=1.0)
    engine.note_prefill(1000, 1.0)  # 1 ms per token: 16 ms per chunk to recompute
    prompts = [make_tokens(64, seed=s) for s in range(8)]
    for p in prompts:
        engine.store(p, make_kv(64))
    assert engine.flush(30)
    slow.spec = SLOWER  # the lower tier turns slow (its writes measured it fast)
    hits = []
    for p in prompts:
        _only_below(engine, p)
        hit = engine.lookup_by_cost(p)
        hits.append(hit)
        if hit:
            with engine.retrieve_chunks(p[:hit]):
                pass
    assert hits[0] == 64  # measured fast so far: loaded
    assert hits[-1] == 0 and hits.count(0) >= len(hits) - 3  # a few slow reads and it is left out
    reads = lower.reads
    time.sleep(1.1)  # past reprobe_s: the next lookup re-measures it in the background
    _only_below(engine, prompts[0])  # its first load promoted it to RAM
    assert engine.lookup_by_cost(prompts[0]) == 0  # still slow: not loaded on the request's path
    deadline = time.monotonic() + 30
    while lower.reads == reads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lower.reads > reads


def test_a_slow_single_tier_counts_its_lookup_and_read_round_trips() -> None:
    """Defect: a slow top tier read in one batched call looked cheap per byte (its latency
    spread over the batch) and its lookup round trip was not counted, so it was loaded although
    lookup + read cost more than recomputing the whole prompt."""
    cfg = Config.load(env={}, chunk_tokens=CHUNK)
    engine = CacheEngine(
        cfg, tiers=[FaultTier(CPUTier(64 * 1024**2, pin_memory=False), FaultSpec(latency_s=0.05))]
    )
    tokens = make_tokens(64)
    engine.store(tokens, make_kv(64))
    engine.note_prefill(1000, 1.0)  # 1 ms per token: 64 ms to recompute the prompt, 16 ms per chunk
    assert engine.lookup_by_cost(tokens) == 64  # never measured: asked, and loaded
    with engine.retrieve_chunks(tokens):  # one batched read: 50 ms for 4 chunks
        pass
    assert engine.lookup_by_cost(tokens) == 0  # lookup 50 ms + read 50 ms > 64 ms recompute


def test_worth_asking_is_false_only_while_every_tier_would_be_left_out() -> None:
    """What an integration asks before keying a request: ``False`` exactly when
    ``lookup_by_cost`` would ask no tier (and none is due for its re-measure)."""
    cfg = Config.load(env={}, chunk_tokens=CHUNK, cost={"reprobe_s": 0.3})
    engine = CacheEngine(
        cfg, tiers=[FaultTier(CPUTier(64 * 1024**2, pin_memory=False), FaultSpec(latency_s=0.05))]
    )
    tokens = make_tokens(64)
    engine.store(tokens, make_kv(64))
    engine.note_prefill(1000, 1.0)  # 1 ms per token
    assert engine.worth_asking(64)  # never measured: asked
    assert engine.lookup_by_cost(tokens) == 64
    with engine.retrieve_chunks(tokens):
        pass
    assert engine.worth_asking(64 * 1000)  # 64 s to recompute: a 100 ms load is worth it
    assert engine.lookup_by_cost(tokens) == 0  # left out: its skip clock starts
    lookups = engine.stats().lookups
    assert not engine.worth_asking(64) and engine.stats().lookups == lookups + 1  # counted, no hit
    time.sleep(0.35)
    assert engine.worth_asking(64)  # due for its re-measure: lookup_by_cost starts it
    engine.config.cost.enabled = False
    assert engine.worth_asking(64)
