"""The HTTP face against a real daemon: /health, /stats, /metrics, POST /lookup, `kvtier stats`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import make_kv, make_tokens

from kvtier import CacheEngine, Config
from kvtier.cli import main
from kvtier.keys import KeyExtras, MMSpan, lora_identity
from kvtier.server.process import DaemonProcess
from kvtier.wire.token_file import read_token_file

NS = {"model_id": "http-test", "kv_dtype": "float32", "kv_shape": [4, 2, 16]}


def _get(url: str, token: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: Any, token: str = "") -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _engine(url: str) -> CacheEngine:
    cfg = Config.load(
        env={}, cpu__enabled=False, remote__url=url, chunk_tokens=16, model__model_id="http-test"
    )
    eng = CacheEngine(cfg)
    eng.bind_model(4, 2, 16, torch.float32)
    return eng


def test_lookup_matches_the_engine(daemon: DaemonProcess) -> None:
    tokens = make_tokens(100, seed=3)
    tok = read_token_file(daemon.info["token_file"])  # the daemon's generated token: /lookup needs it
    assert _post(daemon.http_url + "/lookup", {"tokens": tokens.tolist(), **NS})[0] == 401
    with _engine(daemon.url) as eng:
        assert eng.store(tokens[:80], make_kv(80, seed=3)) == 80
        base = daemon.http_url + "/lookup"
        code, r = _post(base, {"tokens": tokens.tolist(), **NS}, tok)
        assert code == 200, r
        assert r == {"cached_tokens": 80, "cached_chunks": 5, "total_tokens": 100}
        assert eng.lookup(tokens) == 80
        code, r = _post(base, {"tokens": tokens.tolist(), **NS, "cache_salt": "other-tenant"}, tok)
        assert (code, r["cached_tokens"]) == (200, 0)  # another namespace: nothing
        code, r = _post(base, {"tokens": tokens.tolist(), **NS, "chunk_tokens": 32}, tok)
        assert (code, r["cached_tokens"]) == (200, 0)  # other chunking, other keys
    for bad, why in (
        (b"{not json", "not JSON"),
        ({"tokens": "abc", **NS}, "'tokens'"),
        ({"tokens": [1, -2], **NS}, "token ids"),
        ({"tokens": [1], **NS, "kv_shape": [4, 2]}, "kv_shape"),
        ({"tokens": [1], "kv_dtype": "float32", "kv_shape": [4, 2, 16]}, "model_id"),
        ([1, 2, 3], "JSON object"),
    ):
        code, r = _post(base, bad, tok)
        assert code == 400 and why in r["error"], (bad, r)


def test_lookup_takes_the_request_key_extras(daemon: DaemonProcess, tmp_path: Path) -> None:
    """#16: a router asking for a salted / LoRA / multimodal request gets that request's answer,
    not the base one: the daemon keys the question with the same ``KeyExtras`` the engine stored."""
    tok = read_token_file(daemon.info["token_file"])
    base = daemon.http_url + "/lookup"
    tokens = make_tokens(100, seed=21)
    lora_dir = tmp_path / "lora-a"
    lora_dir.mkdir()
    (lora_dir / "adapter_model.safetensors").write_bytes(b"weights v1")
    image = MMSpan("img-hash-1", 40, 8)  # inside chunk [32, 48)
    stored = {
        "salt": KeyExtras(salt="S"),
        "lora": KeyExtras(adapter=lora_identity("a", str(lora_dir))),
        "raw": KeyExtras(adapter="some-engine-adapter-id"),
    }
    with _engine(daemon.url) as eng:
        for i, ex in enumerate(stored.values()):
            assert eng.store(tokens[:80], make_kv(80, seed=30 + i), extras=ex) == 80
        with_image = make_tokens(100, seed=22)
        assert eng.store(with_image[:80], make_kv(80, seed=40), extras=KeyExtras(mm=(image,))) == 80

        def ask(extras: Any = None, toks: Any = tokens) -> int:
            body = {"tokens": toks.tolist(), **NS, **({} if extras is None else {"extras": extras})}
            code, r = _post(base, body, tok)
            assert code == 200, r
            return int(r["cached_tokens"])

        assert ask() == 0  # nothing was stored bare
        assert ask({"salt": "S"}) == 80
        assert ask({"salt": "T"}) == 0  # found only when asked with S
        assert ask({"salt": "S", "adapter": "some-engine-adapter-id"}) == 0  # salt and adapter: other keys
        assert ask({"lora_name": "a", "lora_path": str(lora_dir)}) == 80  # derived as vLLM's connector does
        assert ask({"lora_name": "b", "lora_path": str(lora_dir)}) == 0
        assert ask({"adapter": "some-engine-adapter-id"}) == 80
        mm = {"identifier": image.identifier, "offset": image.offset, "length": image.length}
        assert ask({"mm": [mm]}, with_image) == 80
        assert (
            ask({"mm": [{**mm, "identifier": "img-hash-2"}]}, with_image) == 32
        )  # text before it still hits
        assert ask(None, with_image) == 32
        (lora_dir / "adapter_model.safetensors").write_bytes(b"weights v2, retrained in place")
        assert ask({"lora_name": "a", "lora_path": str(lora_dir)}) == 0  # new files, new key
        assert eng.lookup(tokens, extras=stored["salt"]) == 80  # the engine agrees
        code, r = _post(
            base, {"tokens": tokens.tolist(), **NS, "kv_codec": "int8", "extras": {"salt": "S"}}, tok
        )
        assert (code, r["cached_tokens"]) == (200, 0)  # a quantized namespace is another one
    for extras, why in (
        ("S", "'extras' must be an object"),
        ({"salty": "S"}, "unknown fields ['salty']"),
        ({"salt": 5}, "'extras.salt'"),
        ({"adapter": "x", "lora_name": "a"}, "either 'adapter'"),
        ({"mm": [{"identifier": "", "offset": 0, "length": 1}]}, "extras.mm[0]"),
        ({"mm": [{"identifier": "i", "offset": -1, "length": 1}]}, "extras.mm[0]"),
        ({"mm": "img"}, "'extras.mm'"),
    ):
        code, r = _post(base, {"tokens": [1, 2], **NS, "extras": extras}, tok)
        assert code == 400 and why in r["error"], (extras, r)
    code, r = _post(base, {"tokens": [1, 2], **NS, "kv_codec": "zip"}, tok)
    assert code == 400 and "'kv_codec'" in r["error"]


def test_health_stats_metrics_and_cli(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, body = _get(daemon.http_url + "/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    code, body = _get(daemon.http_url + "/stats")
    stats = json.loads(body)
    assert code == 200 and stats["server"]["lookups"] >= 0 and "tier:cpu" in stats
    assert stats["tier:cpu"]["capacity_bytes"] == 64 << 20
    code, body = _get(daemon.http_url + "/metrics")
    text = body.decode()
    assert code == 200 and 'kvtier_tier_capacity_bytes{tier="cpu"} 6.7108864e+07' in text
    assert "kvtier_server_requests_total" in text and "kvtier_server_active_sessions" in text
    assert _get(daemon.http_url + "/nope")[0] == 404
    r = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "stats", "--url", daemon.http_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "capacity_bytes" in r.stdout and "64MiB" in r.stdout and "requests" in r.stdout
    assert main(["stats", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 2
    assert "cannot read stats" in capsys.readouterr().err
    assert main(["stats", "--url", daemon.http_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tier:cpu"]["capacity_bytes"] == 64 << 20


def test_token_guards_stats_and_lookup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = "/stats"
    tok = tmp_path / "tok"
    tok.write_text("t0ken")
    with DaemonProcess("--cpu-size", "4MiB", "--auth-token-file", str(tok)) as d:
        assert _get(d.http_url + path)[0] == 401
        assert _get(d.http_url + path, "t0ken")[0] == 200
        assert _post(d.http_url + "/lookup", {"tokens": [1], **NS})[0] == 401
        assert _post(d.http_url + "/lookup", {"tokens": [1], **NS}, "t0ken")[0] == 200
        assert _get(d.http_url + "/health")[0] == 200  # probes stay open
        assert main(["stats", "--url", d.http_url]) == 2
        assert "401" in capsys.readouterr().err
        assert main(["stats", "--url", d.http_url, "--auth-token-file", str(tok)]) == 0
        assert "capacity_bytes" in capsys.readouterr().out
