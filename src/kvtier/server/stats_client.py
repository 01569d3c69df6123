"""Reading a daemon's counters over its HTTP face (``GET /stats``), for ``kvtier stats`` and bench."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

__all__ = ["fetch_stats"]


def fetch_stats(url: str, token: str = "", timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    req = urllib.request.Request(url.rstrip("/") + "/stats")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        data: dict[str, dict[str, Any]] = json.loads(r.read())
    return data
