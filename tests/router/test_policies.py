"""Routing policies: one suite over every policy, plus each one's own rule (no I/O, injected clock)."""

from __future__ import annotations

import pytest

from kvtier.router.backends import Backend
from kvtier.router.config import BackendSpec, RouterConfigError
from kvtier.router.policies import KvAware, LeastLoad, RoundRobin, RouteContext, Session, make_policy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def pool(n: int, clock: Clock) -> list[Backend]:
    return [Backend(BackendSpec(f"http://e{i}:8000", f"http://d{i}:8080"), clock=clock) for i in range(n)]


ALL = ["kv-aware", "round-robin", "session", "least-load"]


@pytest.mark.parametrize("name", ALL)
def test_every_policy_orders_all_instances_and_puts_down_ones_last(name: str) -> None:
    clock = Clock()
    bs = pool(3, clock)
    bs[0].mark_down(5.0)
    p = make_policy(name)
    for _ in range(6):
        d = p.order(bs, RouteContext(session="s", cached={b.name: 0 for b in bs}))
        assert sorted(b.name for b in d.order) == sorted(b.name for b in bs)
        assert d.order[-1] is bs[0]
    clock.t += 5.0  # cool-down over: back in the rotation
    firsts = {p.order(bs, RouteContext(session=f"s{i}")).order[0].name for i in range(6)}
    assert bs[0].name in firsts or name == "session"


@pytest.mark.parametrize("name", ALL)
def test_every_policy_still_answers_when_all_are_down(name: str) -> None:
    clock = Clock()
    bs = pool(2, clock)
    bs[1].mark_down(1.0)
    bs[0].mark_down(2.0)
    d = make_policy(name).order(bs, RouteContext())
    assert [b.name for b in d.order] == [bs[1].name, bs[0].name]  # soonest back first


def test_round_robin_takes_turns() -> None:
    bs = pool(3, Clock())
    p = RoundRobin()
    assert [p.order(bs, RouteContext()).order[0].name for _ in range(6)] == [b.name for b in bs] * 2


def test_least_load_picks_fewest_in_flight_and_rotates_ties() -> None:
    bs = pool(3, Clock())
    bs[0].inflight, bs[1].inflight, bs[2].inflight = 3, 1, 1
    p = LeastLoad()
    firsts = [p.order(bs, RouteContext()).order[0].name for _ in range(4)]
    assert set(firsts) == {bs[1].name, bs[2].name}


def test_kv_aware_longest_prefix_then_load() -> None:
    bs = pool(3, Clock())
    bs[2].inflight = 2
    p = KvAware(LeastLoad())
    d = p.order(bs, RouteContext(cached={bs[0].name: 128, bs[1].name: 512, bs[2].name: 512}))
    assert d.order[0] is bs[1] and d.order[1] is bs[2] and d.reason == "prefix"
    d = p.order(bs, RouteContext(cached={bs[0].name: 0, bs[1].name: 0, bs[2].name: 0}))
    assert d.order[0] is not bs[2] and d.reason == "load"


def test_kv_aware_without_answers_falls_back() -> None:
    bs = pool(2, Clock())
    bs[0].inflight = 1
    p = KvAware(LeastLoad())
    for cached in (None, {}, {bs[0].name: None, bs[1].name: None}):
        d = p.order(bs, RouteContext(cached=cached))
        assert d.order[0] is bs[1] and d.reason == "fallback"
    # one daemon answered, one did not: the silent one counts as holding nothing
    d = p.order(bs, RouteContext(cached={bs[0].name: 256, bs[1].name: None}))
    assert d.order[0] is bs[0] and d.reason == "prefix"


def test_kv_aware_yields_to_load_past_the_balance_gap() -> None:
    bs = pool(2, Clock())
    p = KvAware(LeastLoad(), balance_gap=4)
    cached = {bs[0].name: 1024, bs[1].name: 0}
    bs[0].inflight = 3
    assert p.order(bs, RouteContext(cached=cached)).order[0] is bs[0]
    bs[0].inflight = 4
    assert p.order(bs, RouteContext(cached=cached)).order[0] is bs[1]


def test_session_sticks_and_rebinds_when_its_instance_is_down() -> None:
    clock = Clock()
    bs = pool(3, clock)
    p = Session(RoundRobin())
    first = p.order(bs, RouteContext(session="alice")).order[0]
    for _ in range(5):
        p.order(bs, RouteContext(session="bob"))
        assert p.order(bs, RouteContext(session="alice")).order[0] is first
    first.mark_down(10.0)
    moved = p.order(bs, RouteContext(session="alice")).order[0]
    assert moved is not first
    clock.t += 10.0  # back up: alice stays where she moved (her KV is there now)
    assert p.order(bs, RouteContext(session="alice")).order[0] is moved
    assert p.order(bs, RouteContext()).reason == "fallback"


def test_session_table_is_bounded() -> None:
    bs = pool(2, Clock())
    p = Session(RoundRobin(), max_sessions=10)
    for i in range(100):
        p.order(bs, RouteContext(session=str(i)))
    assert len(p._sticky) == 10


def test_unknown_policy_is_a_kvtier_error() -> None:
    with pytest.raises(RouterConfigError, match="unknown policy"):
        make_policy("random")
