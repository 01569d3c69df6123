"""Forward one request along a policy's order of instances; retry and resume.

* **Retry**: an instance that cannot be reached (refused, reset, timed out) or answers a 5xx
  before the router has sent the client a byte is marked down and the request goes to the next
  instance in the order. A non-streaming answer is read whole before it is sent, so any failure
  of its instance is retried. The client sees an error only when every instance failed (503).
* **Resume** (``resume_streams``): a greedy stream (``temperature`` 0, one choice) whose instance
  dies after some events were sent is re-sent to the next instance; the text the client already
  has (greedy decoding gives the same tokens) is cut from the new stream by characters, not by
  events (an engine may put several tokens in one event), and the client's stream goes on.
  Any other stream that loses its instance ends with an OpenAI error event, never a hang.
* Engine answers (4xx errors included: unknown model, prompt over the context length) pass
  through untouched: the client sees the engine's own error JSON.

Invariant: ``Backend.inflight`` is raised before and lowered after every attempt (``finally``);
an error writing to the *client* (it went away) ends the request and never marks an instance down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from kvtier.errors import KVTierError
from kvtier.router.backends import Backend
from kvtier.router.metrics import RouterMetrics
from kvtier.router.openai_errors import error_event, error_response

log = logging.getLogger(__name__)

FORWARD_HEADERS = ("Content-Type", "Authorization", "Accept", "X-Request-Id")


class ClientGone(KVTierError):
    """The client closed its connection while the router was writing to it."""


class ResumeError(KVTierError):
    """A resumed stream ended before it caught up with what the client already had."""


def greedy(body: dict[str, Any] | None) -> bool:
    """Same body, same tokens on every instance: temperature 0 and a single choice of one prompt."""
    if not body:
        return False
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], str | list)
    return body.get("temperature") == 0 and int(body.get("n") or 1) == 1 and not batch


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Server-sent events, each with its trailing blank line; a partial last event is dropped."""
    buf: list[bytes] = []
    while True:
        line = await content.readline()
        if not line:
            return
        buf.append(line)
        if line in (b"\n", b"\r\n"):
            yield b"".join(buf)
            buf = []


def is_data(event: bytes) -> bool:
    return event.lstrip().startswith(b"data:") and b"[DONE]" not in event[:16]


def _parse(event: bytes) -> dict[str, Any] | None:
    try:
        ev = json.loads(event.lstrip()[5:])
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


def event_text(event: bytes) -> str:
    """The generated text an event carries (completions ``text``, chat ``delta.content``)."""
    ev = _parse(event) if is_data(event) else None
    if ev is None:
        return ""
    out = []
    for c in ev.get("choices") or ():
        if isinstance(c, dict):
            out.append(str(c.get("text") or (c.get("delta") or {}).get("content") or ""))
    return "".join(out)


def resume_cut(event: bytes, skip: int) -> tuple[bytes | None, int]:
    """A resumed stream's event with the first ``skip`` characters (already sent) removed:
    (the event to forward or None, characters still to skip). An event that only repeats what
    the client has (a chat role chunk, sent text) is dropped; one that ends the stream is kept."""
    ev = _parse(event) if is_data(event) else None
    if ev is None:
        return (event if not is_data(event) else None), skip
    choices = [c for c in ev.get("choices") or () if isinstance(c, dict)]
    text = event_text(event)
    final = bool(ev.get("usage")) or any(c.get("finish_reason") for c in choices)
    if skip >= len(text) and not final:
        return None, skip - len(text)
    cut = min(skip, len(text))
    for c in choices[:1]:  # greedy() allows one choice
        if "text" in c:
            c["text"] = text[cut:]
        elif isinstance(c.get("delta"), dict):
            c["delta"] = {k: v for k, v in c["delta"].items() if k != "role"} | {"content": text[cut:]}
    return b"data: " + json.dumps(ev).encode() + b"\n\n", skip - cut


class Proxy:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: RouterMetrics,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        cooldown_s: float,
        resume_streams: bool = True,
    ) -> None:
        self.session = session
        self.metrics = metrics
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self.cooldown_s = cooldown_s
        self.resume_streams = resume_streams

    def _headers(self, request: web.Request) -> dict[str, str]:
        return {h: request.headers[h] for h in FORWARD_HEADERS if h in request.headers}

    async def fetch(
        self, order: list[Backend], method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, str] | None:
        """A whole answer from the first instance that gives one: (status, body, content type)."""
        for i, b in enumerate(order):
            last = i == len(order) - 1
            try:
                with self._count(b):
                    async with self.session.request(
                        method, b.spec.url + path, data=body, headers=headers, timeout=self.timeout
                    ) as r:
                        data = await r.read()
                        if r.status >= 500 and not last:
                            self._failed(b, f"HTTP {r.status}", mark=r.status in (502, 503, 504))
                            continue
                        b.mark_up()
                        self.metrics.backend_requests.labels(backend=b.name, outcome=str(r.status)).inc()
                        return r.status, data, r.headers.get("Content-Type", "application/json")
            except (aiohttp.ClientError, TimeoutError) as e:
                self._failed(b, f"{type(e).__name__}: {e}")
        return None

    async def forward(
        self,
        request: web.Request,
        order: list[Backend],
        path: str,
        raw: bytes,
        body: dict[str, Any] | None,
        t0: float,
    ) -> web.StreamResponse:
        headers = self._headers(request)
        stream = bool(body and body.get("stream"))
        if not stream:
            got = await self.fetch(order, "POST", path, raw, headers)
            if got is None:
                return error_response(503, f"no engine instance answered ({len(order)} tried); retry later")
            self.metrics.first_byte_seconds.observe(time.perf_counter() - t0)
            status, data, ctype = got
            return web.Response(status=status, body=data, headers={"Content-Type": ctype})
        return await self._stream(request, order, path, raw, body, headers, t0)

    async def _stream(
        self,
        request: web.Request,
        order: list[Backend],
        path: str,
        raw: bytes,
        body: dict[str, Any] | None,
        headers: dict[str, str],
        t0: float,
    ) -> web.StreamResponse:
        out: web.StreamResponse | None = None
        sent = 0  # characters of generated text the client has
        events = 0  # data events the client has
        resumable = self.resume_streams and greedy(body)
        for i, b in enumerate(order):
            last = i == len(order) - 1
            if out is not None and not resumable:
                break
            try:
                with self._count(b):
                    async with self.session.post(
                        b.spec.url + path, data=raw, headers=headers, timeout=self.timeout
                    ) as r:
                        if r.status >= 500 and not last and out is None:
                            await r.read()
                            self._failed(b, f"HTTP {r.status}", mark=r.status in (502, 503, 504))
                            continue
                        ctype = r.headers.get("Content-Type", "")
                        if out is None and (r.status != 200 or not ctype.startswith("text/event-stream")):
                            data = await r.read()  # an error answer: whole, then passed through
                            self.metrics.backend_requests.labels(backend=b.name, outcome=str(r.status)).inc()
                            return web.Response(status=r.status, body=data, headers={"Content-Type": ctype})
                        if out is None:
                            self.metrics.first_byte_seconds.observe(time.perf_counter() - t0)
                            out = web.StreamResponse(
                                status=200, headers={"Content-Type": ctype, "Cache-Control": "no-cache"}
                            )
                            await _write(request, out, None)
                        skip, resuming = sent, events > 0
                        async for event in sse_events(r.content):
                            if resuming:
                                cut, skip = resume_cut(event, skip)
                                if cut is None:
                                    continue
                                event, resuming = cut, skip > 0
                            await _write(request, out, event)
                            sent += len(event_text(event))
                            events += is_data(event)
                        if skip:
                            raise ResumeError(f"the resumed stream was {skip} characters short")
                        b.mark_up()
                        self.metrics.backend_requests.labels(backend=b.name, outcome="200").inc()
                        await _write(request, out, b"", eof=True)
                        return out
            except ClientGone:
                log.info("kvtier router: the client left during a stream from %s", b.name)
                return out if out is not None else web.Response(status=499)
            except (aiohttp.ClientError, TimeoutError, ResumeError) as e:
                self._failed(b, f"{type(e).__name__}: {e}", streamed=sent)
        if out is None:
            return error_response(503, f"no engine instance answered ({len(order)} tried); retry later")
        try:
            await _write(request, out, error_event(502, "the engine instance serving this stream failed"))
            await _write(request, out, b"", eof=True)
        except ClientGone:
            pass
        return out

    def _count(self, b: Backend) -> _InFlight:
        return _InFlight(b, self.metrics)

    def _failed(self, b: Backend, reason: str, *, mark: bool = True, streamed: int = 0) -> None:
        log.warning(
            "kvtier router: %s failed (%s)%s; trying the next instance",
            b.name,
            reason,
            f" after {streamed} characters" if streamed else "",
        )
        if mark:
            b.mark_down(self.cooldown_s)
        self.metrics.backend_requests.labels(backend=b.name, outcome="failed").inc()
        self.metrics.retries.labels(reason="resume" if streamed else "connect").inc()


class _InFlight:
    def __init__(self, b: Backend, metrics: RouterMetrics) -> None:
        self.b, self.gauge = b, metrics.inflight.labels(backend=b.name)

    def __enter__(self) -> None:
        self.b.inflight += 1
        self.b.served += 1
        self.gauge.inc()

    def __exit__(self, *exc: object) -> None:
        self.b.inflight -= 1
        self.gauge.dec()


async def _write(
    request: web.Request, out: web.StreamResponse, data: bytes | None, *, eof: bool = False
) -> None:
    """Every write to the client goes through here: its failure is ``ClientGone``, never an
    instance failure (the stream's last chunk too: a client may close right after ``[DONE]``)."""
    try:
        if data is None:
            await out.prepare(request)
        elif eof:
            await out.write_eof()
        else:
            await out.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
        raise ClientGone() from e
