"""A fake OpenAI-compatible streaming server, for testing the HTTP driver's *timer* only.

It sends the response headers and an empty chunk at once, waits ``delay_s``, streams the first
token, then waits ``tail_s`` before the rest: a correct TTFT is ~``delay_s`` (not the header
time, not the end of the stream). Binds 127.0.0.1 on a free port; ``close()`` stops it.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeStreamingServer:
    def __init__(
        self,
        *,
        delay_s: float = 0.3,
        tail_s: float = 0.5,
        tokens: int = 4,
        chunked: bool = True,
        status: int = 200,
        send_text: bool = True,
        eos_first: bool = False,
        cached_tokens: int | None = None,
    ) -> None:
        self.cached_tokens = cached_tokens  # vLLM's usage.prompt_tokens_details.cached_tokens
        self.delay_s, self.tail_s, self.tokens = delay_s, tail_s, tokens
        self.chunked, self.status, self.send_text, self.eos_first = chunked, status, send_text, eos_first
        self.bodies: list[dict[str, Any]] = []
        self.events: list[tuple[str, int, float]] = []  # ("start"|"end", request index, time)
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if srv.chunked else "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps({"data": [{"id": "fake-model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _write(self, data: bytes) -> None:
                if srv.chunked:
                    data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
                self.wfile.write(data)
                self.wfile.flush()

            def _event(self, obj: Any) -> None:
                self._write(
                    b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
                )

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv._lock:
                    idx = len(srv.bodies)
                    srv.bodies.append(body)
                    srv.events.append(("start", idx, time.perf_counter()))
                if srv.status != 200:
                    msg = b'{"error": "overloaded"}'
                    self.send_response(srv.status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if srv.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                self._write(b": keep-alive\n\n")
                self._event({"choices": [{"index": 0, "text": ""}]})  # no token yet: must not stop the timer
                time.sleep(srv.delay_s)
                if srv.eos_first:  # as vLLM streams a first token that is EOS: no text, a finish_reason
                    self._event({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
                    time.sleep(srv.tail_s)
                text = "tok" if srv.send_text else ""
                for i in range(srv.tokens):
                    self._event({"choices": [{"index": 0, "text": f" {text}{i}" if text else ""}]})
                    if i == 0:
                        time.sleep(srv.tail_s)
                self._event(
                    {
                        "choices": [],
                        "usage": {
                            "prompt_tokens": len(body["prompt"]),
                            "completion_tokens": srv.tokens,
                            **(
                                {"prompt_tokens_details": {"cached_tokens": srv.cached_tokens}}
                                if srv.cached_tokens is not None
                                else {}
                            ),
                        },
                    }
                )
                # "end" before the [DONE] that ends the client's read: recorded after it, a client
                # could start its next request first (a test saw the next turn 1 ms before "end")
                with srv._lock:
                    srv.events.append(("end", idx, time.perf_counter()))
                self._event(b"[DONE]")
                if srv.chunked:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()

        return Handler
