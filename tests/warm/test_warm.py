"""``kvtier warm`` in process: warm a corpus into a disk tier, then a request in a fresh engine
(as a serving process would start) hits it — as prefix chunks, and as blend segments; a second
run skips every document without running the model; bad input is one line, exit 2."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parents[1] / "vllm"))
from tiny_model import build_tiny_llama

from kvtier import CacheEngine, Config
from kvtier.cli import main
from kvtier.integrations import transformers as kvt
from kvtier.models import load_model

CHUNK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, 500)}" for _ in range(n))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(words(1, 70))
    with (d / "more.jsonl").open("w") as f:
        for i, n in enumerate((45, 100)):
            f.write(json.dumps({"id": f"doc{i}", "text": words(10 + i, n)}) + "\n")
    return d


def warm_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["warm", "--chunk-tokens", str(CHUNK), "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def engine_on(disk: Path) -> CacheEngine:
    return CacheEngine(
        Config.load(
            env={}, chunk_tokens=CHUNK, cpu__max_bytes="16MiB", disk__enabled=True, disk__path=str(disk)
        )
    )


def ids(lm: Any, text: str) -> list[int]:
    return list(lm.tokenizer(text)["input_ids"])


def test_warm_then_a_request_hits(
    model_dir: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "kv"
    code, out, err = warm_cli(capsys, str(corpus), "--model", str(model_dir), "--disk-path", str(disk),
                              "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["documents"] == 3 and rep["warmed"] == 3 and rep["skipped"] == 0
    assert rep["tokens"] == 70 + 45 + 100 == rep["computed_tokens"] == rep["stored_tokens"]
    disk_rep = rep["tiers"]["disk"]
    assert disk_rep["chunks"] == 5 + 3 + 7  # 70, 45, 100 tokens: full chunks + a tail chunk each
    assert disk_rep["written_bytes"] > 0 and "tier disk: +15 chunks" in out
    assert "\r" not in err  # no progress bar when stderr is not a terminal

    lm = load_model(str(model_dir))
    engine = engine_on(disk)  # a fresh engine on the same disk: what a serving process would see
    try:
        doc = ids(lm, words(11, 100))
        prompt = doc + ids(lm, words(99, 9))  # the document, then a question
        import torch

        r = kvt.prefill(lm.model, torch.tensor([prompt]), engine, model_id=lm.model_id)
        assert r.hit_tokens == 96  # the document's 6 full chunks, from the disk tier
    finally:
        engine.close()

    # resumable: a second run finds every document stored and runs no model forward
    code, out, err = warm_cli(capsys, str(corpus), "--model", str(model_dir), "--disk-path", str(disk))
    assert code == 0, err
    assert "warmed 0, already stored 3" in out and "computed 0, stored 0" in out


def test_warm_segments_then_a_blended_request_reuses_them(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    docs = tmp_path / "docs.jsonl"
    texts = [words(20, 40), words(21, 56)]
    docs.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    disk = tmp_path / "kv"
    code, out, err = warm_cli(capsys, str(docs), "--text-field", "body", "--mode", "segments",
                              "--model", str(model_dir), "--disk-path", str(disk))  # fmt: skip
    assert code == 0, err
    assert "warmed 2" in out and "stored 96" in out

    lm = load_model(str(model_dir))
    engine = engine_on(disk)
    try:
        head, question = ids(lm, words(30, 5)), ids(lm, words(31, 7))
        d0, d1 = (ids(lm, t) for t in texts)
        prompt = head + d1 + d0 + question  # the other order: no prefix reuse possible
        spans = [(5, 5 + len(d1)), (5 + len(d1), 5 + len(d1) + len(d0))]
        r = kvt.prefill(lm.model, torch.tensor([prompt]), engine, model_id=lm.model_id, segments=spans)
        assert r.segment_tokens == 96  # both documents' KV came from the warmed segments
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("setup", "extra", "expect"),
    [
        ("missing", [], "no such file or folder"),
        ("badjson", [], "bad.jsonl:2: not a JSON object"),
        ("nofield", ["--text-field", "body"], "no string field 'body'"),
        (
            "ok",
            ["--mode", "segments", "--url", "http://127.0.0.1:9/v1"],
            "--mode segments needs the in-process",
        ),
        ("ok", ["--url", "http://127.0.0.1:9/v1"], "cannot list the models of http://127.0.0.1:9/v1"),
        ("ok", ["--model", "random:tiny"], "keeps KV only in this process's memory"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, extra: list[str], expect: str
) -> None:
    path = tmp_path / "bad.jsonl"
    if setup == "badjson":
        path.write_text('{"text": "w3 w4"}\n{oops\n')
    elif setup in ("nofield", "ok"):
        path.write_text('{"text": "w3 w4"}\n')
    code, _, err = warm_cli(capsys, str(path), *extra)
    assert code == 2, err
    assert expect in err and len(err.strip().splitlines()) == 1, err
