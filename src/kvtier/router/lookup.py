"""Ask every instance's kvtier daemon, at once, how many of a prompt's tokens it holds.

One ``POST /lookup`` per daemon, all concurrent, each bounded by ``timeout_s``: a request pays
at most one timeout for the whole fan-out, however many daemons are slow. A daemon that fails
answers ``None`` for that request; one that refuses the connection or answers badly (non-200, no
``cached_tokens``) is skipped for ``cooldown_s`` at once, one that times out ``strikes`` times in
a row is skipped then: a daemon on a loaded host that is late once keeps its prefix signal for
the next request (a cool-down after a single late answer routed every request of the next
``cooldown_s`` blind: measured, benchmarks/bench_router.py), a hung one costs ``strikes``
timeouts per cool-down. The routing degrades (kv-aware without that instance's signal), never
fails.
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
        strikes: int = 1,
        metrics: RouterMetrics,
    ) -> None:
        self.session = session
        self.namespace = namespace
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.cooldown_s = cooldown_s
        self.strikes = strikes
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
                    b.lookup_timeouts = 0
                    return int(data["cached_tokens"])
                reason = f"HTTP {r.status}: {str(data)[:200]}"
        except TimeoutError:
            self.metrics.lookup_failures.labels(backend=b.name).inc()
            if b.lookup_timed_out(self.strikes, self.cooldown_s):
                self._skipped(b, f"{self.strikes} timeouts in a row")
            else:
                log.info(
                    "kvtier router: lookup at %s timed out (%d in a row)",
                    b.spec.lookup_url,
                    b.lookup_timeouts,
                )
            return None
        except (aiohttp.ClientError, ValueError) as e:
            reason = f"{type(e).__name__}: {e}"
        # NOTE: a 400 (a namespace the daemon refuses) is a setting to fix, logged; still a miss.
        self.metrics.lookup_failures.labels(backend=b.name).inc()
        b.mark_lookup_down(self.cooldown_s)
        self._skipped(b, reason)
        return None

    def _skipped(self, b: Backend, reason: str) -> None:
        log.warning(
            "kvtier router: lookup at %s failed (%s); skipping it for %.0f s",
            b.spec.lookup_url,
            reason,
            self.cooldown_s,
        )
