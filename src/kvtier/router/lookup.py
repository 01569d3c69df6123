"""Ask every instance's kvtier daemon, at once, how many of a prompt's tokens it holds.

One ``POST /lookup`` per daemon, all concurrent, each bounded by ``timeout_s``: a request pays
at most one timeout for the whole fan-out, however many daemons are slow. A daemon that fails
(refused, timed out, a non-200 answer, a body without ``cached_tokens``) answers ``None`` and is
skipped for ``cooldown_s``, so a dead daemon costs one timeout per cool-down, not per request;
the routing then degrades (kv-aware without that instance's signal), never fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from kvtier.router.backends import Backend
from kvtier.router.config import LookupNamespace
from kvtier.router.metrics import RouterMetrics

log = logging.getLogger(__name__)


class LookupClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        namespace: LookupNamespace,
        *,
        timeout_s: float,
        cooldown_s: float,
        metrics: RouterMetrics,
    ) -> None:
        self.session = session
        self.namespace = namespace
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.cooldown_s = cooldown_s
        self.metrics = metrics

    async def cached_tokens(
        self, backends: Sequence[Backend], tokens: list[int], extras: dict[str, Any] | None = None
    ) -> dict[str, int | None]:
        """backend name -> cached prefix tokens (None: no answer); only daemons that are up are asked.
        ``extras``: the request's key extras (``{"salt": ...}``), the daemon's ``/lookup`` ``extras``."""
        asked = [b for b in backends if b.lookup_up()]
        if not asked:
            return {}
        body = self.namespace.body(tokens)
        if extras:
            body["extras"] = extras
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(self._one(b, body) for b in asked))
        self.metrics.lookup_seconds.observe(time.perf_counter() - t0)
        return {b.name: n for b, n in zip(asked, answers)}

    async def _one(self, b: Backend, body: dict[str, object]) -> int | None:
        headers = {"Authorization": f"Bearer {b.spec.token}"} if b.spec.token else {}
        try:
            async with self.session.post(
                b.spec.lookup_url + "/lookup", json=body, headers=headers, timeout=self.timeout
            ) as r:
                data = await r.json(content_type=None)
                if r.status == 200 and isinstance(data, dict) and isinstance(data.get("cached_tokens"), int):
                    return int(data["cached_tokens"])
                reason = f"HTTP {r.status}: {str(data)[:200]}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
        # NOTE: a 400 (a namespace the daemon refuses) is a setting to fix, logged; still a miss.
        log.warning(
            "kvtier router: lookup at %s failed (%s); skipping it for %.0f s",
            b.spec.lookup_url,
            reason,
            self.cooldown_s,
        )
        self.metrics.lookup_failures.labels(backend=b.name).inc()
        b.mark_lookup_down(self.cooldown_s)
        return None
