"""``--stats-url``: the delta of a real kvtier daemon's /stats counters gives the run's key hit rate."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine, Config
from kvtier.bench.runner import stats_delta
from kvtier.server.process import DaemonProcess
from kvtier.server.stats_client import fetch_stats


def test_stats_delta_of_a_real_daemon() -> None:
    with DaemonProcess("--cpu-size", "64MiB", "--chunk-tokens", "16") as d:
        cfg = Config.load(
            env={}, cpu__enabled=False, remote__url=d.url, chunk_tokens=16, model__model_id="bench"
        )
        with CacheEngine(cfg) as eng:
            eng.bind_model(4, 2, 16, torch.float32)
            tokens = make_tokens(96, seed=5)
            assert eng.store(tokens[:64], make_kv(64, seed=5)) == 64
            before = fetch_stats(d.http_url)
            assert eng.lookup(tokens) == 64  # 4 of 6 chunks
            assert eng.lookup(make_tokens(32, seed=6)) == 0  # 0 of 2 chunks
            delta = stats_delta(before, fetch_stats(d.http_url))
    assert delta["lookups"] >= 2 and delta["lookup_keys"] >= 8  # the daemon may be asked more than once
    assert delta["hit_keys"] == 4  # the 4 stored chunks, found by the first lookup only
    assert delta["hit_lookups"] == 1  # one lookup found chunks; the miss and any follow-up found none
    assert delta["request_hit_rate"] == pytest.approx(1 / delta["lookups"])
    assert delta["hit_rate"] == pytest.approx(delta["hit_keys"] / delta["lookup_keys"])
    assert 0.0 < delta["hit_rate"] < 1.0 and "cpu" in delta["tiers"]
