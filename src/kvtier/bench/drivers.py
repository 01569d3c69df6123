"""Drivers: send one benchmark request to a target and time it.

* ``TransformersDriver``: in-process Hugging Face model, plain (``engine=None``) or through
  kvtier's transformers integration. TTFT = request start to the first token's logits ready;
  kvtier's store of the new KV runs after that point and is billed to ``latency_s`` (the
  request's end-to-end time, greedy decode of ``max_tokens`` included), never to TTFT.
* ``HttpDriver``: any OpenAI-compatible server (vLLM, SGLang, ...), streaming ``/completions``.
  TTFT = request sent to the first streamed chunk that carries text (or a ``finish_reason``: the
  first token was EOS). Response headers, an empty keep-alive or role-only chunk do not count;
  nor does the rest of the stream (``latency_s``). ``ignore_eos`` (vLLM/SGLang) fixes output lengths.
  ``hit_tokens`` is the server's ``usage.prompt_tokens_details.cached_tokens`` when it reports one
  (vLLM ``--enable-prompt-tokens-details``): prompt tokens it did not compute, from any cache.

A failed request is a ``Result`` with ``error`` set (and NaN times), never an exception: one
bad request must not lose a long run's measurements.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

from kvtier.bench.workloads import Request, WorkloadError


@dataclass
class Result:
    label: str
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    latency_s: float
    hit_tokens: int | None = None  # in-process kvtier's hits; over HTTP the server's usage cached_tokens
    output: list[int] | str | None = None  # greedy token ids (in-process) or streamed text (HTTP)
    error: str | None = None
    segment_tokens: int | None = None  # blend: prompt tokens reused from segments (re-rotated)
    recomputed_tokens: int | None = None  # blend: of those, recomputed after the check layer

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        d = dict(d)
        for k in ("ttft_s", "latency_s"):
            d[k] = math.nan if d.get(k) is None else float(d[k])
        return cls(**d)


class Driver(Protocol):
    name: str

    def run(self, req: Request) -> Result: ...

    def cache_stats(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class TransformersDriver:
    """A transformers model in this process; ``engine`` None = plain transformers (no cache).

    ``recompute_ratio`` set (with an engine): requests that carry ``segments`` (rag) are blended
    (``kvtier.blend``: documents reused at any position, that share of their tokens recomputed);
    other requests use prefix caching as usual.
    """

    def __init__(
        self,
        name: str,
        model: Any,
        engine: Any | None = None,
        *,
        model_id: str | None = None,
        recompute_ratio: float | None = None,
    ) -> None:
        self.name, self.model, self.engine, self.model_id = name, model, engine, model_id
        self.recompute_ratio = recompute_ratio
        self.device = next(model.parameters()).device

    def run(self, req: Request) -> Result:
        import torch

        from kvtier.demo.runner import greedy, plain_prefill
        from kvtier.integrations import transformers as kvt

        ids = torch.tensor(req.prompt, dtype=torch.long, device=self.device).unsqueeze(0)
        t0 = time.perf_counter()
        hit: int | None = None
        seg: tuple[int | None, int | None] = (None, None)
        if self.engine is None:
            logits, cache, ttft = plain_prefill(self.model, ids)
        else:
            blend: dict[str, Any] = {}
            if self.recompute_ratio is not None and req.segments:
                blend = dict(segments=[list(s) for s in req.segments], recompute_ratio=self.recompute_ratio)
            r = kvt.prefill(self.model, ids, self.engine, model_id=self.model_id, **blend)
            logits, cache, ttft, hit = r.logits, r.cache, r.ttft_s, r.hit_tokens
            if blend:
                seg = (r.segment_tokens, r.recomputed_tokens)
        tokens = greedy(self.model, logits, cache, req.max_tokens) if req.max_tokens > 0 else []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        latency = time.perf_counter() - t0
        return Result(req.label, len(req.prompt), len(tokens), ttft, latency, hit, tokens, None, *seg)

    def cache_stats(self) -> dict[str, Any] | None:
        return None if self.engine is None else self.engine.stats().to_dict()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class HttpDriver:
    """Streaming ``POST {url}/completions``; one connection per request (no queueing behind another)."""

    def __init__(
        self,
        name: str,
        url: str,
        model: str,
        *,
        send: str = "ids",
        decode: Any = None,
        timeout_s: float = 300.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        u = urllib.parse.urlsplit(url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise WorkloadError(f"--url must look like http://HOST:PORT/v1, got {url!r}")
        if send not in ("ids", "text") or (send == "text" and decode is None):
            raise WorkloadError("send='text' needs a tokenizer to turn the prompt ids back into text")
        self.name, self.model, self.send, self.decode = name, model, send, decode
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.path = u.path + "/completions"
        self.timeout_s = timeout_s
        self.extra = extra or {}

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout_s)

    def body(self, req: Request) -> bytes:
        prompt: Any = list(req.prompt) if self.send == "ids" else self.decode(list(req.prompt))
        return json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": req.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **self.extra,
            }
        ).encode()

    def run(self, req: Request) -> Result:
        body = self.body(req)
        conn = self._connect()
        try:
            conn.connect()  # connection set-up is not part of the server's TTFT
            t0 = time.perf_counter()
            conn.request(
                "POST", self.path, body, {"Content-Type": "application/json", "Accept": "text/event-stream"}
            )
            resp = conn.getresponse()
            if resp.status != 200:
                detail = resp.read(500).decode(errors="replace")
                return _failed(req, f"HTTP {resp.status}: {detail}")
            ttft, text, chunks, usage = _read_stream(resp, t0)
            latency = time.perf_counter() - t0
        except (OSError, http.client.HTTPException, ValueError) as e:
            return _failed(req, f"{type(e).__name__}: {e}")
        finally:
            conn.close()
        if ttft is None:
            return _failed(req, "the stream ended without a token")
        n_out = int(usage.get("completion_tokens", chunks)) if usage else chunks
        # NOTE: the engine's own count of prompt tokens it did not compute (its prefix cache and
        # kvtier's loads together): vLLM reports it with --enable-prompt-tokens-details.
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") if usage else None
        hit = int(cached) if isinstance(cached, int) and not isinstance(cached, bool) else None
        return Result(req.label, len(req.prompt), n_out, ttft, latency, hit, text)

    def cache_stats(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


def _failed(req: Request, error: str) -> Result:
    return Result(req.label, len(req.prompt), 0, math.nan, math.nan, None, None, error)


def _read_stream(resp: http.client.HTTPResponse, t0: float) -> tuple[float | None, str, int, dict[str, Any]]:
    """Server-sent events: (TTFT or None, text, chunks with text, usage). ``[DONE]`` ends it."""
    ttft: float | None = None
    parts: list[str] = []
    chunks = 0
    usage: dict[str, Any] = {}
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, ": keep-alive" comments, event: lines
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if event.get("error"):
            raise WorkloadError(f"server error in stream: {event['error']}")
        usage = event.get("usage") or usage
        choices = event.get("choices") or ()
        text = "".join(str(c.get("text") or "") for c in choices)
        # A finish_reason without text is a token too: the model's first token was EOS (or a stop
        # string), which ends generation with no text; the server has produced it at this point.
        if ttft is None and (text or any(c.get("finish_reason") for c in choices)):
            ttft = time.perf_counter() - t0
        if text:
            chunks += 1
            parts.append(text)
    return ttft, "".join(parts), chunks, usage


def first_model(url: str, timeout_s: float = 10.0) -> str:
    """The first model id a server lists at ``{url}/models`` (what ``--server-model`` defaults to)."""
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout_s) as r:
        data = json.loads(r.read())
    models = data.get("data") or []
    if not models:
        raise WorkloadError(f"{url}/models lists no model; pass --server-model")
    return str(models[0]["id"])
