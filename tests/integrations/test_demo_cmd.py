"""``kvtier demo`` end to end on a tiny random model (the SmolLM2 run is ``make demo``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.cli import main

SMALL = [
    "--users",
    "2",
    "--rounds",
    "2",
    "--system-tokens",
    "80",
    "--turn-tokens",
    "20",
    "--docs",
    "1",
    "--questions",
    "2",
    "--doc-tokens",
    "120",
    "--gen-tokens",
    "3",
    "--chunk-tokens",
    "16",
    "--no-progress",
]


def test_demo_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "demo",
            "--model",
            "random:tiny",
            "--out",
            str(tmp_path),
            "--contexts",
            "64",
            "--repeat",
            "2",
            *SMALL,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("chat", "docqa", "context"):
        assert f"== {name}:" in out
    assert out.count("greedy outputs identical with and without kvtier: yes") == 3
    assert "speedup" in out and "token hit rate" in out and "bytes per tier: cpu" in out
    png = tmp_path / "ttft.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--workloads", "chat,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["demo", "--workloads", "context"]) == 2
    assert main(["demo", "--set", "chunk.nope=1"]) == 2


def test_demo_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--device", "--contexts", "--no-disk", "--out", "random:NAME"):
        assert flag in text


def test_demo_rag_blends_passages_and_reports_agreement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rag = ["--workloads", "rag", "--pool", "3", "--k", "2", "--rag-requests", "4", "--rag-doc-tokens", "40"]
    args = ["demo", "--model", "random:tiny", "--out", str(tmp_path), *rag, "--gen-tokens", "3"]
    args += ["--chunk-tokens", "16", "--no-progress", "--no-disk"]
    assert main([*args, "--recompute-ratio", "1.0"]) == 0  # 1.0: blending is exact in fp32
    out = capsys.readouterr().out
    assert "== rag:" in out and "passage tokens reused at other positions" in out
    assert "greedy outputs identical 4/4, first token 4/4" in out
    reused = int(out.split("blend (CacheBlend, approximate by design): ")[1].split(" ")[0].replace(",", ""))
    assert reused > 0
    assert main([*args, "--recompute-ratio", "-0.1"]) == 2
    assert "--recompute-ratio must be in [0, 1]" in capsys.readouterr().err
