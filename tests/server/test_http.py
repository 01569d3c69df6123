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
