"""The daemon's HTTP face: ``/health``, ``/stats`` (JSON), ``/metrics`` (Prometheus), ``POST /lookup``.

``POST /lookup`` lets a router ask "how much of this request's prompt do you hold?" without
speaking the binary protocol (body and rules: ``server/lookup.py``).

stdlib ``ThreadingHTTPServer`` in a thread: no new dependency, and these endpoints are small.
``/lookup`` needs ``Authorization: Bearer TOKEN`` (it reveals which prompts are cached), and so
does ``/stats`` when the operator gave a token file (``guard_stats``); ``/health`` and
``/metrics`` stay open for probes and scrapers. Bodies are bounded
(``MAX_BODY_BYTES``, ``MAX_LOOKUP_TOKENS``); a bad body is a 400 naming the problem.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvtier.server.health import health
from kvtier.server.lookup import LookupBodyError, lookup
from kvtier.server.service import CacheService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20


class HttpFace:
    """The HTTP server thread of one daemon."""

    def __init__(
        self, service: CacheService, host: str, port: int, *, token: str = "", guard_stats: bool = True
    ) -> None:
        self.service = service
        self.token = token
        self.guard_stats = guard_stats
        self.metrics = service.metrics  # daemon-true series only (server/metrics.py)
        self._httpd = ThreadingHTTPServer((host, port), _handler_class(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kvtier-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        want = f"Bearer {self.token}".encode()
        return header is not None and hmac.compare_digest(header.encode(), want)


def _handler_class(face: HttpFace) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvtier"
        timeout = 30

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode())

        def _guard(self) -> bool:
            if face.authorized(self.headers.get("Authorization")):
                return True
            self._json(401, {"error": "missing or wrong 'Authorization: Bearer TOKEN'"})
            return False

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                s = face.service
                self._json(200, health(s.manager.tiers, s.counters.active_sessions))
            elif path == "/metrics":
                self._send(200, face.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/stats":
                if not face.guard_stats or self._guard():
                    self._json(200, face.service.stats())
            else:
                self._json(404, {"error": f"no such endpoint {path!r}; try /health /stats /metrics /lookup"})

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            if path != "/lookup":
                self._json(404, {"error": f"no such endpoint {path!r} for POST; try /lookup"})
                return
            if not self._guard():
                return
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self._json(400, {"error": f"need a Content-Length of 0..{MAX_BODY_BYTES} bytes"})
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                self._json(200, lookup(face.service, body))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._json(400, {"error": f"body is not JSON: {e}"})
            except LookupBodyError as e:
                self._json(400, {"error": str(e)})

    return Handler
