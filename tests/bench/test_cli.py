"""``kvtier bench`` end to end: in process on a real (tiny, random-weight) transformers model with
and without kvtier, over HTTP against the fake streaming server, and ``--compare`` of the two files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.bench.fake_server import FakeStreamingServer

from kvtier.cli import main

pytest.importorskip("transformers")

TINY = [
    "--users",
    "2",
    "--rounds",
    "2",
    "--system-tokens",
    "64",
    "--turn-tokens",
    "16",
    "--docs",
    "2",
    "--doc-tokens",
    "48",
    "--questions",
    "2",
    "--pool",
    "3",
    "--rag-doc-tokens",
    "24",
    "--k",
    "2",
    "--rag-requests",
    "3",
    "--capacity-tokens",
    "64",
    "--context-tokens",
    "48",
    "--max-tokens",
    "2",
    "--chunk-tokens",
    "16",
    "--no-progress",
]


def test_in_process_with_and_without_kvtier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inproc.json"
    rc = main(
        [
            "bench",
            "--model",
            "random:tiny",
            "--variants",
            "without,with,capped",
            *TINY,
            "--json",
            str(out),
            "--plot-dir",
            str(tmp_path),
            "--set",
            "cpu.pin_memory=no",
            # exact hit rates below: load-or-recompute weighs measured times, and on a loaded
            # machine a tiny model's prefill can beat the timed CPU tier (docqa 0.25, a CI run)
            "--set",
            "cost.enabled=false",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    got = {w["name"]: {v["name"]: v for v in w["variants"]} for w in doc["workloads"]}
    assert list(got) == ["chat", "docqa", "rag", "pressure"]
    for name, variants in got.items():
        assert list(variants) == ["without kvtier", "with kvtier", "capped (engine-sized)"]
        base = [r["output"] for r in variants["without kvtier"]["results"]]
        for v in variants.values():  # kvtier never changes the greedy output
            assert [r["output"] for r in v["results"]] == base, name
    # chat and docqa reuse prefixes; the cyclic pressure workload defeats the engine-sized cache only
    assert got["chat"]["with kvtier"]["summary"]["token_hit_rate"] > 0.3
    assert got["docqa"]["with kvtier"]["summary"]["request_hit_rate"] == 0.5
    assert got["pressure"]["with kvtier"]["summary"]["request_hit_rate"] == 0.5
    assert got["pressure"]["capped (engine-sized)"]["summary"]["token_hit_rate"] == 0.0
    assert got["chat"]["without kvtier"]["summary"]["token_hit_rate"] is None
    assert "== pressure:" in text and "greedy outputs identical" in text
    assert (tmp_path / "bench_ttft_cdf.png").stat().st_size > 1000


def test_http_run_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = FakeStreamingServer(delay_s=0.02, tail_s=0.0, tokens=2)
    files = []
    try:
        for label in ("plain", "kvtier"):
            files.append(tmp_path / f"{label}.json")
            rc = main(
                [
                    "bench",
                    "--url",
                    srv.url,
                    "--label",
                    label,
                    "--workloads",
                    "chat,rag",
                    "--concurrency",
                    "2",
                    *TINY,
                    "--json",
                    str(files[-1]),
                ]
            )
            assert rc == 0, capsys.readouterr()
    finally:
        srv.close()
    assert len(srv.bodies) == 2 * (4 + 3) and all(b["model"] == "fake-model" for b in srv.bodies)
    capsys.readouterr()
    assert (
        main(["bench", "--compare", str(files[0]), str(files[1]), "--plot-dir", str(tmp_path / "cmp")]) == 0
    )
    text = capsys.readouterr().out
    assert "== chat: plain (A) vs kvtier (B) ==" in text and "B kvtier" in text and "== rag:" in text
    assert (tmp_path / "cmp" / "bench_ttft_vs_context.png").is_file()


def test_http_fleet_chat_flags_reach_the_requests(capsys: pytest.CaptureFixture[str]) -> None:
    """--private-tokens / --turn-order random shape the prompts; --cache-salt is in every body
    (so two runs of one sequence share no prefix in vLLM or kvtier)."""
    srv = FakeStreamingServer(delay_s=0.0, tail_s=0.0, tokens=1)
    chat = ["--workloads", "chat", "--users", "3", "--rounds", "3", "--system-tokens", "32"]
    try:
        args = [*chat, "--private-tokens", "80", "--turn-order", "random", "--cache-salt", "run-7"]
        assert main(["bench", "--url", srv.url, *args, "--turn-tokens", "8", "--no-progress"]) == 0
    finally:
        srv.close()
    capsys.readouterr()
    assert len(srv.bodies) == 9 and all(b["cache_salt"] == "run-7" for b in srv.bodies)
    prompts = [b["prompt"] for b in srv.bodies]
    assert min(len(p) for p in prompts) >= 32 + 80  # system prompt + the private document
    docs = {tuple(p[32:48]) for p in prompts}  # each user's document starts after the system prompt
    assert len(docs) == 3
    users = [sorted(docs).index(tuple(p[32:48])) for p in prompts]
    assert users != users[:3] * 3  # interleaved at random, not round-major


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["bench", "--url", "http://127.0.0.1:9/v1", "--server-model", "m", "--workloads", "video"]) == 2
    )
    assert "unknown" in capsys.readouterr().err
    assert main(["bench", "--compare", "/nonexistent/a.json", "/nonexistent/b.json"]) == 2


def test_rag_blend_variant_reports_reuse_and_quality(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "blend.json"
    rag = ["--pool", "3", "--rag-doc-tokens", "24", "--k", "2", "--rag-requests", "4", "--max-tokens", "2"]
    args = ["bench", "--model", "random:tiny", "--workloads", "rag", "--variants", "without,with,blend", *rag]
    args += ["--chunk-tokens", "16", "--no-progress", "--set", "cpu.pin_memory=no", "--json", str(out)]
    rc = main([*args, "--recompute-ratio", "1.0"])  # 1.0: blending must be exact (fp32)
    text = capsys.readouterr().out
    assert rc == 0, text
    variants = {v["name"]: v for v in json.loads(out.read_text())["workloads"][0]["variants"]}
    blend = variants["kvtier + blend 100%"]
    s = blend["summary"]
    assert s["segment_tokens"] > 0 and s["recomputed_tokens"] == s["segment_tokens"]
    # documents recur at other positions: blend reuses more than prefix caching
    assert s["token_hit_rate"] > variants["with kvtier"]["summary"]["token_hit_rate"]
    q = blend["blend_quality"]
    assert q == {"requests": 4, "identical_outputs": 4, "first_token_agreement": 4}
    assert "reused from segments" in text and "greedy outputs identical 4/4" in text
    assert "segment_tokens" not in variants["with kvtier"]["summary"]
    assert main([*args, "--recompute-ratio", "1.5"]) == 2
    assert "--recompute-ratio must be in [0, 1]" in capsys.readouterr().err
