"""Summaries, JSON round trip, --compare and plots, on hand-made results with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvtier.bench import report
from kvtier.bench.drivers import Result
from kvtier.bench.plots import plot_all
from kvtier.bench.runner import VariantRun, stats_delta


def run(
    name: str, ttfts_ms: list[float], hits: list[int | None] | None = None, wall_s: float = 2.0
) -> VariantRun:
    hits = hits or [None] * len(ttfts_ms)
    res = [
        Result(f"r{i}", 100, 4, t / 1e3, t / 1e3 + 0.01, h, [1, 2, 3, 4])
        for i, (t, h) in enumerate(zip(ttfts_ms, hits))
    ]
    return VariantRun(name, res, wall_s)


def test_summary_percentiles_throughput_and_hit_rates() -> None:
    s = report.summarize(run("with", [float(x) for x in range(1, 101)], [0] * 50 + [50] * 50, wall_s=4.0))
    assert s["ttft_mean_ms"] == pytest.approx(50.5)
    assert s["ttft_p50_ms"] == pytest.approx(50.5) and s["ttft_p90_ms"] == pytest.approx(90.1)
    assert s["ttft_p99_ms"] == pytest.approx(99.01)
    assert s["throughput_tok_s"] == pytest.approx(100 * 104 / 4.0) and s["output_tok_s"] == pytest.approx(100)
    assert s["request_hit_rate"] == pytest.approx(0.5) and s["token_hit_rate"] == pytest.approx(0.25)
    plain = report.summarize(run("without", [10.0, 20.0]))
    assert plain["request_hit_rate"] is None and plain["token_hit_rate"] is None


def test_paired_speedup_is_the_median_per_request_ratio() -> None:
    base, fast = run("a", [100.0, 200.0, 400.0]), run("b", [50.0, 50.0, 400.0])
    assert report.paired_speedup(base, fast) == pytest.approx(2.0)  # ratios 2, 4, 1
    assert report.paired_speedup(base, run("c", [1.0])) is None  # different requests: no pairing


def test_failed_requests_are_counted_not_averaged() -> None:
    r = run("x", [10.0, 30.0])
    r.results.append(Result("bad", 100, 0, math.nan, math.nan, error="HTTP 503"))
    s = report.summarize(r)
    assert s["errors"] == 1 and s["requests"] == 3 and s["ttft_mean_ms"] == pytest.approx(20.0)
    text = report.format_workload(report.WorkloadRuns("chat", {}, [r]))
    assert "1 failed requests" in text and "HTTP 503" in text


def test_daemon_stats_delta_gives_the_key_hit_rate() -> None:
    before = {
        "server": {"lookups": 5, "lookup_keys": 40, "hit_keys": 10, "uptime_s": 3.0},
        "tier:cpu": {"chunks": 1},
    }
    after = {
        "server": {"lookups": 9, "lookup_keys": 140, "hit_keys": 85, "uptime_s": 9.0},
        "tier:cpu": {"chunks": 7},
    }
    d = stats_delta(before, after)
    assert d["lookups"] == 4 and d["lookup_keys"] == 100 and d["hit_rate"] == pytest.approx(0.75)
    assert d["tiers"] == {"cpu": {"chunks": 7}} and "uptime_s" not in d
    r = run("http", [5.0, 6.0])
    r.cache = d
    assert report.summarize(r)["token_hit_rate"] == pytest.approx(0.75)


def test_json_round_trip_compare_and_plots(tmp_path: Path) -> None:
    a = [
        report.WorkloadRuns(
            "chat",
            {"users": 2},
            [run("without kvtier", [100.0, 120.0]), run("with kvtier", [40.0, 60.0], [64, 64])],
        )
    ]
    b = [report.WorkloadRuns("chat", {"users": 2}, [run("vllm+kvtier", [25.0, 25.0])])]
    report.save(report.to_json(a, {"target": "t"}), tmp_path / "a.json")
    report.save(report.to_json(b, {"target": "t"}), tmp_path / "b.json")
    doc, back = report.load(tmp_path / "a.json")
    assert doc["target"] == "t" and doc["workloads"][0]["variants"][1]["summary"][
        "ttft_mean_ms"
    ] == pytest.approx(50.0)
    assert [[x.ttft_s for x in r.results] for r in back[0].runs] == [
        [x.ttft_s for x in r.results] for r in a[0].runs
    ]
    assert "greedy outputs identical to 'without kvtier': with kvtier 2/2" in report.format_workload(back[0])
    _, b2 = report.load(tmp_path / "b.json")
    text = report.format_compare("a", back, "b", b2)
    lines = text.splitlines()
    assert lines[0] == "== chat: a (A) vs b (B) =="
    assert lines[-1].startswith("B vllm+kvtier") and lines[-1].rstrip().endswith("4.40x")  # 110 ms / 25 ms
    merged = report.merge_for_compare(back, b2, "a", "b")
    paths = plot_all(merged, tmp_path / "plots", "test")
    assert [p.name for p in paths] == ["bench_ttft_cdf.png", "bench_ttft_vs_context.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000 for p in paths)


def test_load_rejects_other_files(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text('{"hello": 1}')
    with pytest.raises(report.ReportError, match="not a kvtier bench JSON"):
        report.load(p)
    with pytest.raises(report.ReportError, match="cannot read"):
        report.load(tmp_path / "missing.json")
