"""Routing policies: each orders the instances for one request, best first; no I/O.

The order is also the retry order: the proxy tries the next instance when one cannot be
reached. Instances that are down (cool-down after a failure) come last in every policy, so a
request still has somewhere to go when all look down. One base, one method per policy
(``rank``), shared tie-breaks: fewer in-flight requests, then a rotating index (so equal
instances take turns instead of the first one taking everything).

* ``kv-aware``: longest cached prefix first (tokens the instance's daemon holds), then load.
  A prefix holder with ``balance_gap`` more requests in flight than the least loaded instance
  is ranked by load instead (a hot prefix must not pile every user on one instance). Without
  any answer from the daemons (all down or none configured) it is the fallback policy.
* ``session``: the instance a session (header value) was first routed to, while it is up;
  a new or orphaned session goes where the fallback policy says and sticks there.
* ``least-load``: fewest in-flight requests. ``round-robin``: take turns.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvtier.router.backends import Backend
from kvtier.router.config import RouterConfigError


@dataclass(frozen=True)
class RouteContext:
    """What a request tells the policy: its session key and each instance's cached tokens
    (``None``: that daemon did not answer; an absent key: it was not asked)."""

    session: str | None = None
    cached: Mapping[str, int | None] | None = None


@dataclass(frozen=True)
class Decision:
    order: list[Backend]
    reason: str  # prefix | load | turn | session | fallback: why order[0] was chosen


class Policy:
    name = "base"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def order(self, backends: Sequence[Backend], ctx: RouteContext) -> Decision:
        up = [b for b in backends if b.is_up()]
        down = [b for b in backends if not b.is_up()]
        turn = next(self._turn)
        ranked, reason = self.rank(up, ctx, turn) if up else ([], "fallback")
        # NOTE: down instances keep a fixed order among themselves, soonest back first
        return Decision(ranked + sorted(down, key=lambda b: b.down_until), reason)

    def rank(self, up: list[Backend], ctx: RouteContext, turn: int) -> tuple[list[Backend], str]:
        raise NotImplementedError

    @staticmethod
    def rotated(up: list[Backend], turn: int) -> list[Backend]:
        k = turn % len(up)
        return up[k:] + up[:k]


class RoundRobin(Policy):
    name = "round-robin"

    def rank(self, up: list[Backend], ctx: RouteContext, turn: int) -> tuple[list[Backend], str]:
        return self.rotated(up, turn), "turn"


class LeastLoad(Policy):
    name = "least-load"

    def rank(self, up: list[Backend], ctx: RouteContext, turn: int) -> tuple[list[Backend], str]:
        return sorted(self.rotated(up, turn), key=lambda b: b.inflight), "load"  # sort is stable


class KvAware(Policy):
    name = "kv-aware"

    def __init__(self, fallback: Policy, balance_gap: int = 8) -> None:
        super().__init__()
        self.fallback = fallback
        self.balance_gap = balance_gap

    def rank(self, up: list[Backend], ctx: RouteContext, turn: int) -> tuple[list[Backend], str]:
        cached = ctx.cached or {}
        if not any(cached.get(b.name) is not None for b in up):
            ranked, _ = self.fallback.rank(up, ctx, turn)
            return ranked, "fallback"
        least = min(b.inflight for b in up)

        def key(b: Backend) -> tuple[int, int]:
            hit = cached.get(b.name) or 0
            if b.inflight - least >= self.balance_gap:
                hit = 0  # overloaded: its prefix no longer buys the lowest TTFT
            return (-hit, b.inflight)

        ranked = sorted(self.rotated(up, turn), key=key)
        best = cached.get(ranked[0].name) or 0
        return ranked, ("prefix" if best > 0 else "load")


class Session(Policy):
    name = "session"

    def __init__(self, fallback: Policy, max_sessions: int = 100_000) -> None:
        super().__init__()
        self.fallback = fallback
        self.max_sessions = max_sessions
        self._sticky: OrderedDict[str, str] = OrderedDict()  # session -> backend name, LRU-bounded

    def rank(self, up: list[Backend], ctx: RouteContext, turn: int) -> tuple[list[Backend], str]:
        ranked, _ = self.fallback.rank(up, ctx, turn)
        if ctx.session is None:
            return ranked, "fallback"
        bound = self._sticky.get(ctx.session)
        pinned = next((b for b in ranked if b.name == bound), None)
        if pinned is None:  # new session, or its instance is down: rebind
            pinned = ranked[0]
            self._sticky[ctx.session] = pinned.name
            while len(self._sticky) > self.max_sessions:
                self._sticky.popitem(last=False)
        self._sticky.move_to_end(ctx.session)
        return [pinned] + [b for b in ranked if b is not pinned], "session"


def make_policy(name: str, fallback: str = "least-load", balance_gap: int = 8) -> Policy:
    simple: dict[str, type[Policy]] = {"round-robin": RoundRobin, "least-load": LeastLoad}
    if name in simple:
        return simple[name]()
    fb = simple[fallback]()
    if name == "kv-aware":
        return KvAware(fb, balance_gap)
    if name == "session":
        return Session(fb)
    raise RouterConfigError(
        f"unknown policy {name!r}; choose from kv-aware, round-robin, session, least-load"
    )
