"""Warming through an OpenAI-compatible server whose kvtier connector stores what it computes.

Each document is one ``POST {url}/completions`` with ``max_tokens=1`` (the server runs the
prefill; the connector saves the prompt's full chunks, e.g. into a kvtier daemon or Redis that
other engines share). The server's cache cannot be asked through the OpenAI API, so resuming
uses a state file: one line per document done (its text's sha256), appended and flushed after
each answer, so an interrupted run loses at most the document in flight.

Invariants:
* A document the server refuses (an HTTP 4xx: too long for its context, ...) is counted in
  ``failed`` and named once; a server that stops answering ends the run with a ``WarmError``
  (the state file keeps what was done).
* The connector stores asynchronously (its write to a daemon or Redis trails the answer), so the
  final per-tier figures are read once the daemon's put counter has been still for
  ``settle_s`` (at most ``SETTLE_MAX_S``): they can still miss a write that trails longer.
* Only ``segments``-free warming: vLLM's connector API reuses prefixes only (README, blending).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kvtier.redact import redact_url
from kvtier.warm.corpus import Document, WarmError
from kvtier.warm.report import WarmReport, daemon_deltas

SETTLE_MAX_S = 30.0


def settled(stats: Callable[[], dict[str, dict[str, Any]]], settle_s: float) -> dict[str, dict[str, Any]]:
    """``stats()`` once the sum of its tiers' ``puts`` has not moved for ``settle_s``."""

    def puts(s: dict[str, dict[str, Any]]) -> int:
        return sum(int(v.get("puts", 0)) for k, v in s.items() if k.startswith("tier:"))

    deadline = time.monotonic() + SETTLE_MAX_S
    last = stats()
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = stats()
        if puts(now) == puts(last):
            return now
        last = now
    return last


def _request(url: str, body: dict[str, Any] | None, api_key: str, timeout_s: float) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def first_model(url: str, api_key: str = "", timeout_s: float = 10.0) -> str:
    """The first model the server lists (``GET /models``); a ``WarmError`` if it cannot be reached."""
    try:
        data = _request(url.rstrip("/") + "/models", None, api_key, timeout_s)
        return str(data["data"][0]["id"])
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise WarmError(
            f"cannot list the models of {redact_url(url)}: {reason} — start the server or fix --url "
            "(an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1)"
        ) from e


class StateFile:
    """The digests of the documents already warmed (one per line, appended as they finish)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: set[str] = set()
        if path is not None and path.exists():
            self.done = {ln.strip() for ln in path.read_text().splitlines() if ln.strip()}

    def add(self, digest: str) -> None:
        self.done.add(digest)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(digest + "\n")


def warm_over_http(
    url: str,
    docs: Iterable[Document],
    *,
    model: str = "",
    state: Path | None = None,
    api_key: str = "",
    timeout_s: float = 600.0,
    stats: Callable[[], dict[str, dict[str, Any]]] | None = None,
    settle_s: float = 1.0,
    tick: Callable[[Document, int], None] | None = None,
) -> WarmReport:
    """Send every document not in ``state`` to ``url``; ``stats``: a kvtier daemon's ``/stats``
    (fetched before and after, for the bytes per tier)."""
    base = url.rstrip("/")
    name = model or first_model(base, api_key)
    done = StateFile(state)
    rep = WarmReport(server=redact_url(base))
    before = stats() if stats is not None else None
    t0 = time.perf_counter()
    for doc in docs:
        rep.documents += 1
        if doc.digest in done.done:
            rep.skipped += 1
            continue
        body = {"model": name, "prompt": doc.text, "max_tokens": 1, "temperature": 0.0}
        try:
            answer = _request(base + "/completions", body, api_key, timeout_s)
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500:
                rep.failed += 1
                rep.failures.append(f"{doc.id}: HTTP {e.code} {e.read()[:200].decode(errors='replace')}")
                continue
            raise WarmError(
                f"{redact_url(base)} answered HTTP {e.code} on {doc.id} — check the server's log"
            ) from e
        except (urllib.error.URLError, OSError) as e:
            raise WarmError(
                f"{redact_url(base)} stopped answering on {doc.id} ({getattr(e, 'reason', e)}) — "
                "restart it and run the same command again: warmed documents are skipped"
                + ("" if state else " if you pass --state FILE")
            ) from e
        n = int((answer.get("usage") or {}).get("prompt_tokens", 0))
        rep.warmed += 1
        rep.tokens += n
        done.add(doc.digest)
        if tick is not None:
            tick(doc, n)
    rep.seconds = time.perf_counter() - t0
    if before is not None and stats is not None:
        rep.tiers = daemon_deltas(before, settled(stats, settle_s) if rep.warmed else stats())
    return rep
