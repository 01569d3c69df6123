"""``vllm_stats``: each count is reported to vLLM once (even when both roles share the counters),
intervals aggregate by sum, a tensor-parallel rank > 0 reports bytes and seconds only."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm_stats import KVTierStats, take_delta
from kvtier.integrations.vllm_worker import ConnectorStats


def test_a_count_is_reported_once_whoever_asks() -> None:
    stats, last = ConnectorStats(), {}  # one ConnectorStats shared by the scheduler and worker roles
    stats.lookups, stats.lookup_tokens, stats.lookup_hit_tokens = 2, 1000, 256
    stats.loaded_tokens, stats.load_s = 256, 0.5
    first = take_delta(stats, last, token_bytes=10)
    assert first == {
        "lookups": 2,
        "lookup_tokens": 1000,
        "lookup_hit_tokens": 256,
        "miss_tokens": 744,
        "loaded_tokens": 256,
        "load_bytes": 2560,
        "load_s": 0.5,
    }
    assert take_delta(stats, last, token_bytes=10) == {}  # the other role: nothing new
    stats.saved_tokens += 128
    assert take_delta(stats, last, token_bytes=10) == {"saved_tokens": 128, "save_bytes": 1280}


def test_rank_above_zero_reports_bytes_and_seconds_only() -> None:
    stats = ConnectorStats(lookups=1, lookup_tokens=10, loaded_tokens=128, load_s=0.25)
    assert take_delta(stats, {}, token_bytes=4, tokens=False) == {"load_bytes": 512, "load_s": 0.25}


def test_intervals_aggregate_and_reduce() -> None:
    a = KVTierStats({"lookup_tokens": 100, "lookup_hit_tokens": 50, "load_bytes": 2**20})
    b = KVTierStats({"lookup_tokens": 100, "lookup_hit_tokens": 0, "miss_tokens": 100})
    r = a.aggregate(b).reduce()
    assert r["kvtier_hit_tokens"] == 50 and r["kvtier_miss_tokens"] == 100
    assert r["kvtier_hit_rate"] == 0.25 and r["kvtier_load_MiB"] == 1.0
    assert KVTierStats({}).is_empty() and not a.is_empty()
