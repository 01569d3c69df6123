"""Stand-in engines and daemons on real sockets (aiohttp), for the router's fast tests.

``Engine``: ``/v1/completions`` and ``/v1/chat/completions`` answer deterministic text (the same
body gives the same tokens on every instance, as greedy decoding does), streamed as vLLM
streams it (one ``data:`` event per token, a usage event, ``[DONE]``); it can refuse a model
(vLLM's 404 body), fail with a status, or drop the connection after ``die_after`` events.
``Daemon``: ``POST /lookup`` answers a fixed ``cached_tokens``, optionally after a delay.
Both record the bodies they received. The real-vLLM tests are in tests/vllm/test_router_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


def tokens_for(body: dict[str, Any]) -> list[str]:
    n = int(body.get("max_tokens") or 4)
    seed = len(json.dumps(body.get("prompt", body.get("messages")), sort_keys=True))
    return [f" t{(seed + i) % 97}" for i in range(n)]


@dataclass
class Engine:
    name: str
    model: str = "m"
    root: str = ""
    die_after: int | None = None  # drop the connection after this many streamed events
    status: int = 200
    linger_s: float = 0.0  # keep the stream open this long after [DONE]
    group: int = 1  # tokens per streamed event (vLLM may put several in one under load)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        return app

    async def start(self) -> Engine:
        self.server = TestServer(self.app())
        await self.server.start_server()
        return self

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "root": self.root or self.model}]}
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "boom", "type": "X", "param": None, "code": self.status}},
                status=self.status,
            )
        if body.get("model") != self.model:
            msg = f"The model `{body.get('model')}` does not exist."
            err = {"error": {"message": msg, "type": "NotFoundError", "param": "model", "code": 404}}
            return web.json_response(err, status=404)
        toks = tokens_for(body)
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": self.name,
                    "choices": [{"text": "".join(toks), "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": len(toks)},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        toks = ["".join(toks[i : i + self.group]) for i in range(0, len(toks), self.group)]
        for i, t in enumerate(toks):
            if self.die_after is not None and i == self.die_after:
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()  # the instance died mid-stream
                return resp
            fin = "length" if i == len(toks) - 1 else None
            ev = {"id": self.name, "choices": [{"index": 0, "text": t, "finish_reason": fin}]}
            await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await asyncio.sleep(self.linger_s)  # a slow close: the stream ends a while after [DONE]
        return resp


@dataclass
class Daemon:
    cached: int = 0
    delay_s: float = 0.0
    delay_first: int = 0  # > 0: only the first N lookups are late (a loaded host's hiccup)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> Daemon:
        app = web.Application()
        app.router.add_post("/lookup", self.lookup)
        self.server = TestServer(app)
        await self.server.start_server()
        return self

    async def lookup(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        if self.delay_s and (not self.delay_first or len(self.bodies) <= self.delay_first):
            await asyncio.sleep(self.delay_s)
        n = min(self.cached, len(body["tokens"]))
        return web.json_response(
            {"cached_tokens": n, "cached_chunks": n // 128, "total_tokens": len(body["tokens"])}
        )


def parse_sse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out
