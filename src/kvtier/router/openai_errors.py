"""The OpenAI error body vLLM answers with, for the errors the router must answer itself.

vLLM 0.32 answers ``{"error": {"message", "type", "param", "code"}}`` (``type`` "Bad Request" for a
body it cannot parse, "NotFoundError" for an unknown model). The router passes an engine's own
error through untouched; it builds this shape only when no engine can answer (a body that is not
JSON, every instance down), so a client parses one shape whatever answered.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

TYPES = {400: "Bad Request", 404: "NotFoundError", 502: "BadGateway", 503: "ServiceUnavailable"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": TYPES.get(status, "Error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


def error_event(status: int, message: str) -> bytes:
    """A server-sent event carrying the error, for a stream that cannot go on."""
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\ndata: [DONE]\n\n"
