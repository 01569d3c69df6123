"""The HTTP driver's timer against a fake streaming server with a known delay before the first token.

The fake server is the only fake here: it exists to test the timer. TTFT must be at least the
delay (it cannot be measured before the token exists) and well below delay + tail (the rest of
the stream is not TTFT), whether the body is chunked (uvicorn, i.e. vLLM/SGLang) or close-delimited.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from tests.bench.fake_server import FakeStreamingServer

from kvtier.bench import runner
from kvtier.bench.drivers import HttpDriver, first_model
from kvtier.bench.workloads import Request, Workload, chat

DELAY_S, TAIL_S = 0.3, 1.0
SLACK_S = 0.3  # scheduling noise allowed on a loaded 2-core CI machine (TAIL_S / 2 > SLACK_S)


@pytest.fixture(params=[True, False], ids=["chunked", "close-delimited"])
def server(request: pytest.FixtureRequest) -> Iterator[FakeStreamingServer]:
    srv = FakeStreamingServer(delay_s=DELAY_S, tail_s=TAIL_S, tokens=4, chunked=request.param)
    yield srv
    srv.close()


def req(n: int = 5, label: str = "r") -> Request:
    return Request("test", label, tuple(range(100, 100 + n)), max_tokens=4)


def test_ttft_is_the_delay_before_the_first_token_not_the_tail(server: FakeStreamingServer) -> None:
    d = HttpDriver("fake", server.url, "fake-model")
    r = d.run(req())
    assert r.error is None
    assert DELAY_S <= r.ttft_s < DELAY_S + SLACK_S, r.ttft_s
    assert r.ttft_s < DELAY_S + TAIL_S / 2  # the streamed tail is not counted
    assert r.latency_s >= DELAY_S + TAIL_S
    assert r.output_tokens == 4  # from the usage chunk
    assert r.output == " tok0 tok1 tok2 tok3"
    body = server.bodies[0]
    assert body["prompt"] == list(range(100, 105)) and body["stream"] is True and body["max_tokens"] == 4
    assert body["model"] == "fake-model" and body["temperature"] == 0.0


def test_the_servers_cached_tokens_are_the_hit_tokens() -> None:
    srv = FakeStreamingServer(delay_s=0.0, tail_s=0.0, cached_tokens=3)
    try:
        r = HttpDriver("fake", srv.url, "fake-model").run(req())
        assert r.error is None and r.hit_tokens == 3
    finally:
        srv.close()
    srv = FakeStreamingServer(delay_s=0.0, tail_s=0.0)
    try:
        assert HttpDriver("fake", srv.url, "fake-model").run(req()).hit_tokens is None  # not reported
    finally:
        srv.close()


def test_repeated_requests_each_measure_their_own_delay(server: FakeStreamingServer) -> None:
    d = HttpDriver("fake", server.url, "fake-model")
    ttfts = [d.run(req(label=str(i))).ttft_s for i in range(3)]
    assert all(DELAY_S <= t < DELAY_S + SLACK_S for t in ttfts), ttfts


def test_error_status_is_a_failed_result_not_an_exception() -> None:
    srv = FakeStreamingServer(status=503)
    try:
        r = HttpDriver("fake", srv.url, "m").run(req())
    finally:
        srv.close()
    assert r.error is not None and "503" in r.error and math.isnan(r.ttft_s)


def test_a_stream_without_text_is_a_failed_result() -> None:
    srv = FakeStreamingServer(delay_s=0.0, tail_s=0.0, send_text=False)
    try:
        r = HttpDriver("fake", srv.url, "m").run(req())
    finally:
        srv.close()
    assert r.error is not None and "without a token" in r.error


def test_eos_as_first_token_stops_the_timer_and_ignore_eos_is_sent() -> None:
    srv = FakeStreamingServer(delay_s=DELAY_S, tail_s=TAIL_S, tokens=0, eos_first=True)
    try:
        r = HttpDriver("fake", srv.url, "m", extra={"ignore_eos": True}).run(req())
    finally:
        srv.close()
    assert r.error is None and r.output == "" and r.output_tokens == 0
    assert DELAY_S <= r.ttft_s < DELAY_S + SLACK_S, r.ttft_s
    assert srv.bodies[0]["ignore_eos"] is True


def test_unreachable_server_is_a_failed_result() -> None:
    srv = FakeStreamingServer()
    url = srv.url
    srv.close()  # nothing listens there now
    r = HttpDriver("fake", url, "m", timeout_s=2.0).run(req())
    assert r.error is not None


def test_bad_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="--url"):
        HttpDriver("x", "127.0.0.1:8000", "m")


def test_first_model_reads_models_endpoint() -> None:
    srv = FakeStreamingServer()
    try:
        assert first_model(srv.url) == "fake-model"
    finally:
        srv.close()


def test_concurrent_chat_turns_wait_for_the_turn_they_extend() -> None:
    srv = FakeStreamingServer(delay_s=0.05, tail_s=0.05, tokens=2)
    encode = lambda text: [ord(c) for c in text]  # noqa: E731 - any deterministic encoder will do here
    w: Workload = chat(encode, users=3, rounds=3, system_tokens=80, turn_tokens=10, max_tokens=2)
    try:
        run = runner.run_workload(w, [HttpDriver("fake", srv.url, "m")], concurrency=3)
    finally:
        srv.close()
    assert [r.error for r in run[0].results] == [None] * 9
    # the server saw requests in parallel (a start before an earlier end) ...
    starts = {i: t for kind, i, t in srv.events if kind == "start"}
    ends = {i: t for kind, i, t in srv.events if kind == "end"}
    assert len(starts) == 9 and min(starts[i] for i in range(1, 3)) < ends[0]
    # ... but every turn started after the turn it extends had finished
    by_prompt = {tuple(b["prompt"]): i for i, b in enumerate(srv.bodies)}
    for r in w.requests:
        if r.depends_on is not None:
            dep = by_prompt[w.requests[r.depends_on].prompt]
            assert starts[by_prompt[r.prompt]] >= ends[dep]
