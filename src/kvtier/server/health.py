"""``GET /health``: is the daemon up, and is every tier below its pool reachable?

The pool (the top tier) lives in this process, so it is up whenever this code runs. Each tier
below it is probed with one ``contains`` of a key that is never stored: a network tier turns a
failure into ``False`` and counts it in ``TierStats.errors`` (it never raises), so a probe whose
error count moved, or a tier whose circuit breaker is not closed, is reported as failing.
Invariant: the answer is ``status: ok`` only if every tier answered its probe; otherwise
``status: degraded`` with the failing tiers named. A degraded daemon still serves (a failing
tier is a cache miss), so the HTTP code stays 200: a liveness probe must not restart it.
A probe costs at most one ``remote.timeout_s`` per tier (a stalled store).
"""

from __future__ import annotations

import logging
from typing import Any

from kvtier.tiers.base import Tier

__all__ = ["PROBE_KEY", "health"]

log = logging.getLogger(__name__)
PROBE_KEY = b"kvtier-health\x00\x00\x00"
"""A key no chunk has (chunk keys are 16-byte hash digests; this one is ASCII), so a probe never hits."""


def _failing(tier: Tier) -> str | None:
    breaker = getattr(tier, "breaker", None)
    state = getattr(getattr(breaker, "state", None), "value", None)
    if state not in (None, "closed"):
        return f"circuit breaker {state}"
    before = tier.stats().errors
    try:
        tier.contains(PROBE_KEY)
    except Exception as e:  # NOTE: /health must answer whatever a tier does; the reason is reported
        return f"{type(e).__name__}: {e}"
    if tier.stats().errors > before:
        return "unreachable (probe failed)"
    return None


def health(tiers: list[Tier], sessions: int) -> dict[str, Any]:
    """The ``/health`` body: ``status`` ok|degraded, ``tiers``, ``failing`` {tier: reason}."""
    failing = {}
    for tier in tiers[1:]:
        reason = _failing(tier)
        if reason is not None:
            failing[tier.name] = reason
    if failing:
        log.debug("health: degraded: %s", failing)
    return {
        "status": "degraded" if failing else "ok",
        "sessions": sessions,
        "tiers": [t.name for t in tiers],
        "failing": failing,
    }
