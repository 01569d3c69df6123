"""Load or recompute in the transformers integration: a request no tier could serve faster than
its prefill is keyed only after its forward (off the TTFT path), and still stored."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import random_ids

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.integrations import transformers as kvt
from kvtier.models import load_model
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.fault import FaultSpec, FaultTier

pytestmark = pytest.mark.cost  # the decision itself: cost.enabled at its product default


class SlowReads(FaultTier):
    """Latency on lookups and reads only (a slow store; its writes are not what is measured)."""

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self.inner.put(key, chunk)


def test_a_declined_request_is_keyed_after_its_forward_and_still_stored() -> None:
    model = load_model("random:llama-tiny").model
    with torch.inference_mode():  # the first forward of a process is slow: not the rate to learn
        model(input_ids=random_ids(64, seed=0), use_cache=True)
    cfg = Config.load(env={}, chunk_tokens=16)
    engine = CacheEngine(
        cfg, tiers=[SlowReads(CPUTier(64 * 1024**2, pin_memory=False), FaultSpec(latency_s=0.4))]
    )
    try:
        warm = random_ids(64, seed=1)
        kvt.prefill(model, warm, engine)  # a miss: stores, measures the prefill
        kvt.prefill(model, warm, engine, store=False)  # never measured: asked and read (400 ms each)
        fit = engine.prefill_fit()
        # 800 ms of tier round trips vs a tiny model's prefill (milliseconds)
        assert not engine.worth_asking(64), f"prefill {fit.seconds(64, 1) * 1e3:.0f} ms for 64 tokens"
        asked: list[Any] = []
        real = engine.lookup_by_cost
        engine.lookup_by_cost = lambda *a, **k: asked.append(a) or real(*a, **k)  # type: ignore[method-assign]
        ids = random_ids(64, seed=2)
        r = kvt.prefill(model, ids, engine)
        assert r.hit_tokens == 0 and asked == []  # not keyed, not looked up before the forward
        stored = engine.lookup(ids[0], extras=kvt.request_extras(model))
        assert r.stored_tokens == 64 and stored == 64  # keyed after it (same keys), and stored
    finally:
        engine.close()
