"""One contract suite, run against every eviction policy (see kvtier/policies/base.py).

Each case is parametrized over ``FACTORIES``: every registered policy by name, plus variants
with tiny ghost lists so ghost trimming is exercised too.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import kvtier.policies as policies_pkg
from kvtier.policies import (
    POLICIES,
    ARCPolicy,
    EvictionPolicy,
    S3FIFOPolicy,
    make_policy,
)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[], EvictionPolicy]

FACTORIES: dict[str, Factory] = {
    **{name: (lambda name=name: make_policy(name, clock=FakeClock())) for name in POLICIES},
    "arc-ghost2": lambda: ARCPolicy(clock=FakeClock(), ghost_capacity=2),
    "s3fifo-ghost1": lambda: S3FIFOPolicy(clock=FakeClock(), ghost_capacity=1),
    "s3fifo-small30": lambda: S3FIFOPolicy(clock=FakeClock(), small_ratio=0.3),
}


@pytest.fixture(params=sorted(FACTORIES))
def factory(request: pytest.FixtureRequest) -> Factory:
    return FACTORIES[request.param]


def drain(policy: EvictionPolicy) -> list[object]:
    """Evict everything, one victim at a time, as a tier would."""
    out = []
    while (key := policy.victim()) is not None:
        out.append(key)
        policy.remove(key)
    return out


# -- registry ---------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(POLICIES) == {"lru", "lfu", "arc", "s3fifo"}
    for name, cls in POLICIES.items():
        policy = make_policy(name)
        assert type(policy) is cls
        assert policy.name == name


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError) as err:
        make_policy("fifo")
    for name in POLICIES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_clock_is_injected(name: str) -> None:
    clock = FakeClock()
    assert make_policy(name, clock=clock).clock is clock
    assert POLICIES[name](clock=clock).clock is clock


# -- contract ---------------------------------------------------------------------------------


def test_empty(factory: Factory) -> None:
    policy = factory()
    assert len(policy) == 0
    assert "a" not in policy
    assert policy.victim() is None
    policy.remove("a")  # untracked: no-op
    policy.access("a")  # a miss is not a hit: no-op
    assert len(policy) == 0
    assert "a" not in policy
    assert policy.victim() is None


def test_insert_tracks(factory: Factory) -> None:
    policy = factory()
    for key in "abc":
        policy.insert(key, size=100)
    assert len(policy) == 3
    assert all(key in policy for key in "abc")
    assert "d" not in policy


def test_victim_is_tracked_and_not_removed(factory: Factory) -> None:
    policy = factory()
    for key in "abc":
        policy.insert(key)
    key = policy.victim()
    assert key in {"a", "b", "c"}
    assert key in policy
    assert len(policy) == 3


def test_victim_twice_is_stable(factory: Factory) -> None:
    policy = factory()
    for key in "abcdef":
        policy.insert(key)
    policy.access("a")
    policy.access("c")
    first = policy.victim()
    assert policy.victim() == first
    assert policy.victim() == first
    assert len(policy) == 6


def test_remove_is_idempotent(factory: Factory) -> None:
    policy = factory()
    for key in "abc":
        policy.insert(key)
    policy.remove("b")
    policy.remove("b")
    assert len(policy) == 2
    assert "b" not in policy
    assert sorted(map(str, drain(policy))) == ["a", "c"]


def test_skip_is_honored(factory: Factory) -> None:
    policy = factory()
    for key in "abcd":
        policy.insert(key)
    policy.access("c")
    assert policy.victim(skip=lambda key: True) is None
    for keep in "abcd":
        assert policy.victim(skip=lambda key, keep=keep: key != keep) == keep
    victim = policy.victim(skip=lambda key: key in {"a", "b"})
    assert victim in {"c", "d"}
    assert len(policy) == 4


def test_drain_evicts_each_key_once(factory: Factory) -> None:
    policy = factory()
    keys = [f"k{i}" for i in range(50)]
    for i, key in enumerate(keys):
        policy.insert(key)
        if i % 3 == 0:
            policy.access(keys[i // 2])
    order = drain(policy)
    assert sorted(map(str, order)) == sorted(keys)
    assert len(policy) == 0


def test_insert_of_tracked_key_is_access(factory: Factory) -> None:
    via_access, via_insert = factory(), factory()
    script = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    for policy in (via_access, via_insert):
        for key in script:
            policy.insert(key)
        policy.remove(policy.victim())  # populate ghost lists, where a policy has them
    for key in ["c", "c", "e", "h"]:
        via_access.access(key)
        via_insert.insert(key, size=7)
    assert len(via_access) == len(via_insert) == 9
    assert drain(via_access) == drain(via_insert)


def test_ghosts_are_not_tracked(factory: Factory) -> None:
    policy = factory()
    for key in "abcd":
        policy.insert(key)
    for _ in range(3):
        policy.remove(policy.victim())
    assert len(policy) == 1
    assert sum(key in policy for key in "abcd") == 1
    for key in "abcd":
        policy.remove(key)
    assert len(policy) == 0
    assert policy.victim() is None


# -- determinism and random operations --------------------------------------------------------


def random_ops(seed: int, n: int, universe: int = 48) -> list[tuple[str, str, frozenset[str]]]:
    """A seeded script of (op, key, pinned) over a small key universe, so keys recur."""
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(universe)]
    ops = []
    for _ in range(n):
        op = rng.choices(["insert", "access", "remove", "victim", "evict"], weights=[40, 25, 10, 10, 15])[0]
        pinned = frozenset(rng.sample(keys, rng.choice([0, 0, 1, 4, 40])))
        ops.append((op, rng.choice(keys), pinned))
    return ops


def apply(policy: EvictionPolicy, op: str, key: str, pinned: frozenset[str]) -> object:
    """Apply one scripted op; returns the victim for victim/evict ops."""
    skip = (lambda k: k in pinned) if pinned else None
    if op == "insert":
        policy.insert(key, size=len(key))
    elif op == "access":
        policy.access(key)
    elif op == "remove":
        policy.remove(key)
    else:
        victim = policy.victim(skip=skip)
        if op == "evict" and victim is not None:
            policy.remove(victim)
        return victim
    return None


def test_two_instances_agree(factory: Factory) -> None:
    a, b = factory(), factory()
    for op, key, pinned in random_ops(seed=7, n=3000):
        assert apply(a, op, key, pinned) == apply(b, op, key, pinned)
        assert len(a) == len(b)
    assert drain(a) == drain(b)


def test_random_operations_keep_invariants(factory: Factory) -> None:
    policy = factory()
    tracked: set[str] = set()
    for step, (op, key, pinned) in enumerate(random_ops(seed=12345, n=10_000)):
        victim = apply(policy, op, key, pinned)
        if op == "insert":
            tracked.add(key)
        elif op == "remove":
            tracked.discard(key)
        elif op in ("victim", "evict"):
            candidates = tracked - pinned
            if candidates:
                assert victim in candidates, (step, op, victim)
            else:
                assert victim is None, (step, op, victim)
            if op == "evict" and victim is not None:
                tracked.discard(str(victim))
        assert len(policy) == len(tracked), step
        assert (key in policy) == (key in tracked), step
        if step % 500 == 0:
            assert {f"k{i}" for i in range(48) if f"k{i}" in policy} == tracked
    assert set(drain(policy)) == tracked
    assert len(policy) == 0


def test_victims_do_not_depend_on_hash_seed() -> None:
    """Same calls in two processes with different PYTHONHASHSEED => same victims."""
    script = textwrap.dedent(
        """
        import random
        from kvtier.policies import POLICIES, make_policy
        for name in sorted(POLICIES):
            rng = random.Random(3)
            p = make_policy(name, clock=lambda: 0.0)
            out = []
            for i in range(400):
                key = ("chunk", str(rng.randrange(60)))
                r = rng.random()
                if r < 0.5:
                    p.insert(key)
                elif r < 0.8:
                    p.access(key)
                else:
                    v = p.victim()
                    out.append(v)
                    if v is not None:
                        p.remove(v)
            print(name, out)
        """
    )
    src = str(Path(policies_pkg.__file__).resolve().parents[2])
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": src}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert outputs[0].count("\n") == len(POLICIES)
