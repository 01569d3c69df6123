"""The router's aiohttp application: OpenAI endpoints, ``/health``, ``/metrics``, the PD two-step.

Per ``/v1/completions`` or ``/v1/chat/completions`` request: parse the body (not JSON -> the
OpenAI error shape, 400), tokenize the prompt with the served model's tokenizer (kv-aware
only), ask the instances' daemons for their cached prefix (``lookup``), let the policy order the
instances, forward (``proxy``: retry, resume). The engine's answer — its errors included —
goes back as it came.

PD two-step (``router.prefill`` + ``router.decode``): the request with ``max_tokens=1``, not
streamed, goes to a prefill instance, whose connector stores the prompt's KV in the tier both
sides reach; then the original request goes to a decode instance, which loads that KV and
computes only the tail, and its answer (streamed or not) is the client's. A prefill instance
that fails costs the decode side a full prefill, never the request; a prefill error answer
(4xx: bad input) is the client's answer, since the decode side would refuse the same body.

The model (tokenizer directory, /lookup model id) defaults to the ``root`` that the engines'
``/v1/models`` reports — vLLM's ``--model`` string, which its connector uses as model id — so
``kvtier router --backend URL,lookup=DAEMON ...`` needs no other setting when the router runs on
a host that sees that directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.config import Config
from kvtier.router.backends import Backend
from kvtier.router.config import LookupNamespace, RouterConfigError, lookup_namespace, parse_backends
from kvtier.router.lookup import LookupClient
from kvtier.router.metrics import RouterMetrics
from kvtier.router.openai_errors import error_response
from kvtier.router.policies import Decision, KvAware, Policy, RouteContext, make_policy
from kvtier.router.proxy import Proxy
from kvtier.router.tokenize import PromptTokenizer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
MODEL_RETRY_S = 5.0  # how often to ask the engines for their model while it is unknown


class Router:
    def __init__(self, cfg: Config) -> None:
        rc = cfg.router
        self.cfg = cfg
        self.pd = bool(rc.prefill)
        if self.pd:
            self.prefill = [Backend(s) for s in parse_backends(rc.prefill, rc.lookup_token_file)]
            self.decode = [Backend(s) for s in parse_backends(rc.decode, rc.lookup_token_file)]
            self.backends = self.prefill + [
                b for b in self.decode if b.name not in {p.name for p in self.prefill}
            ]
        else:
            self.backends = [Backend(s) for s in parse_backends(rc.backends, rc.lookup_token_file)]
            self.prefill, self.decode = [], self.backends
        if not self.backends:
            raise RouterConfigError(
                "no engine instances — pass --backend URL[,lookup=DAEMON_URL] (repeatable) or "
                "--pd prefill=URL,... decode=URL,..."
            )
        self.policy = make_policy(rc.policy, rc.fallback_policy, rc.balance_gap)
        self.prefill_policy = make_policy(rc.policy, rc.fallback_policy, rc.balance_gap)
        self.metrics = RouterMetrics()
        self.namespace: LookupNamespace | None = lookup_namespace(cfg)
        self.tokenizer: PromptTokenizer | None = None
        self._model_checked = -1e9
        self._model_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.proxy: Proxy
        self.lookup: LookupClient | None = None

    # ---- application -------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prom)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        rc = self.cfg.router
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.proxy = Proxy(
            self._session,
            self.metrics,
            connect_timeout_s=rc.connect_timeout_s,
            read_timeout_s=rc.read_timeout_s,
            cooldown_s=rc.cooldown_s,
            resume_streams=rc.resume_streams,
        )
        if self._needs_prefix():
            await self._ensure_model()

    async def _stop(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _needs_prefix(self) -> bool:
        return isinstance(self.policy, KvAware) and any(b.spec.lookup_url for b in self.backends)

    async def _ensure_model(self) -> None:
        """Tokenizer and /lookup namespace, from the config or the engines' /v1/models root."""
        if self.tokenizer is not None and self.namespace is not None:
            return
        async with self._model_lock:
            now = time.monotonic()
            if self.tokenizer is not None or now - self._model_checked < MODEL_RETRY_S:
                return
            self._model_checked = now
            rc = self.cfg.router
            model_dir = rc.tokenizer
            if not model_dir:
                root = await self._served_root()
                if root is None or not (Path(root) / "config.json").is_file():
                    log.warning(
                        "kvtier router: no model directory yet (--tokenizer, or the engines' "
                        "/v1/models root): kv-aware routes by %s for now",
                        rc.fallback_policy,
                    )
                    return
                model_dir = root
            self.namespace = lookup_namespace(self.cfg, model_dir)
            self.tokenizer = await asyncio.to_thread(PromptTokenizer, model_dir)
            if self.namespace is None:
                log.warning(
                    "kvtier router: %s/config.json does not give the KV shape and dtype; set "
                    "model.kv_dtype/num_layers/num_kv_heads/head_dim",
                    model_dir,
                )
                return
            assert self._session is not None
            self.lookup = LookupClient(
                self._session,
                self.namespace,
                timeout_s=rc.lookup_timeout_s,
                cooldown_s=rc.cooldown_s,
                strikes=rc.lookup_strikes,
                metrics=self.metrics,
            )
            log.info(
                "kvtier router: prefix lookups for %s (%s, kv %s, chunk %d)",
                self.namespace.model_id,
                self.namespace.kv_dtype,
                self.namespace.kv_shape,
                self.namespace.chunk_tokens,
            )

    async def _served_root(self) -> str | None:
        got = await self.proxy.fetch(self._up_first(self.backends), "GET", "/v1/models", None, {})
        if got is None or got[0] != 200:
            return None
        try:
            models = json.loads(got[1]).get("data") or []
            return str(models[0].get("root") or models[0]["id"])
        except (ValueError, KeyError, IndexError, AttributeError):
            return None

    @staticmethod
    def _up_first(pool: list[Backend]) -> list[Backend]:
        return sorted(pool, key=lambda b: (not b.is_up(), b.inflight))

    # ---- handlers ----------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def models(self, request: web.Request) -> web.StreamResponse:
        got = await self.proxy.fetch(self._up_first(self.decode), "GET", "/v1/models", None, {})
        if got is None:
            return error_response(503, "no engine instance answered /v1/models; retry later")
        return web.Response(status=got[0], body=got[1], headers={"Content-Type": got[2]})

    async def health(self, request: web.Request) -> web.StreamResponse:
        pools = {"prefill": self.prefill, "decode": self.decode} if self.pd else {"backends": self.backends}
        body: dict[str, Any] = {
            name: [
                {
                    "url": b.name,
                    "up": b.is_up(),
                    "inflight": b.inflight,
                    "served": b.served,
                    "failures": b.failures,
                    "lookup": b.spec.lookup_url or None,
                    "lookup_up": b.lookup_up() if b.spec.lookup_url else None,
                }
                for b in pool
            ]
            for name, pool in pools.items()
        }
        ok = any(b.is_up() for b in self.decode)
        body["status"] = "ok" if ok else "no instance up"
        body["policy"] = self.cfg.router.policy
        return web.json_response(body, status=200 if ok else 503)

    async def prom(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        t0 = time.perf_counter()
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return self._count(
                endpoint, error_response(400, f"the request body is not valid JSON: {e}", "body")
            )
        if not isinstance(body, dict):
            return self._count(
                endpoint, error_response(400, "the request body must be a JSON object", "body")
            )
        if self.pd:
            resp = await self._two_step(request, endpoint, raw, body, t0)
        else:
            d = await self._route(self.backends, self.policy, endpoint, body, request)
            resp = await self.proxy.forward(request, d.order, request.path, raw, body, t0)
        return self._count(endpoint, resp)

    def _count(self, endpoint: str, resp: web.StreamResponse) -> web.StreamResponse:
        self.metrics.requests.labels(endpoint=endpoint, status=str(resp.status)).inc()
        return resp

    async def _route(
        self, pool: list[Backend], policy: Policy, endpoint: str, body: dict[str, Any], request: web.Request
    ) -> Decision:
        cached: dict[str, int | None] | None = None
        if isinstance(policy, KvAware):
            # NOTE: a salted request's chunks carry its salt in their keys: the daemon is asked
            # with the same salt (/lookup extras), so tenants never see each other's prefixes.
            salt = body.get("cache_salt")
            extras = {"salt": salt} if isinstance(salt, str) and salt else None
            await self._ensure_model()
            if self.tokenizer is not None and self.lookup is not None:
                ids = await asyncio.to_thread(self.tokenizer.prompt_ids, endpoint, body)
                if ids:
                    cached = await self.lookup.cached_tokens(pool, ids, extras)
                    self.metrics.prompt_tokens.inc(len(ids))
        d = policy.order(pool, RouteContext(request.headers.get(self.cfg.router.session_header), cached))
        if cached:
            self.metrics.predicted_hit_tokens.inc(cached.get(d.order[0].name) or 0)
        self.metrics.decisions.labels(policy=policy.name, reason=d.reason).inc()
        return d

    async def _two_step(
        self, request: web.Request, endpoint: str, raw: bytes, body: dict[str, Any], t0: float
    ) -> web.StreamResponse:
        pre = {k: v for k, v in body.items() if k != "stream_options"}
        pre.update(max_tokens=1, stream=False)
        if "max_completion_tokens" in pre:
            pre["max_completion_tokens"] = 1
        d = await self._route(self.prefill, self.prefill_policy, endpoint, body, request)
        headers = {h: request.headers[h] for h in ("Content-Type", "Authorization") if h in request.headers}
        got = await self.proxy.fetch(d.order, "POST", request.path, json.dumps(pre).encode(), headers)
        if got is not None and 400 <= got[0] < 500:
            return web.Response(status=got[0], body=got[1], headers={"Content-Type": got[2]})
        self.metrics.decisions.labels(
            policy="pd-prefill", reason="ok" if got and got[0] == 200 else "failed"
        ).inc()
        if got is None or got[0] != 200:
            log.warning(
                "kvtier router: PD prefill failed (%s); the decode instance computes the prompt",
                "no answer" if got is None else f"HTTP {got[0]}",
            )
        d = await self._route(self.decode, self.policy, endpoint, body, request)
        return await self.proxy.forward(request, d.order, request.path, raw, body, t0)
