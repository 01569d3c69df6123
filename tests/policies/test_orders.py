"""Exact eviction orders, worked out by hand from each algorithm and written down literally."""

from __future__ import annotations

from collections.abc import Iterable

from kvtier.policies import ARCPolicy, EvictionPolicy, LFUPolicy, LRUPolicy, S3FIFOPolicy


def clock() -> float:
    return 0.0


def drain(policy: EvictionPolicy) -> list[object]:
    out = []
    while (key := policy.victim()) is not None:
        out.append(key)
        policy.remove(key)
    return out


def insert_all(policy: EvictionPolicy, keys: Iterable[str]) -> None:
    for key in keys:
        policy.insert(key)


def run_cache(policy: EvictionPolicy, requests: Iterable[str], capacity: int) -> list[object]:
    """A tier of ``capacity`` keys: hit -> access; miss -> insert, then evict down to capacity."""
    evicted = []
    for key in requests:
        if key in policy:
            policy.access(key)
            continue
        policy.insert(key)
        while len(policy) > capacity:
            victim = policy.victim()
            evicted.append(victim)
            policy.remove(victim)
    return evicted


# -- LRU --------------------------------------------------------------------------------------


def test_lru_access_refreshes() -> None:
    policy = LRUPolicy(clock)
    insert_all(policy, "abc")
    policy.access("a")
    assert drain(policy) == ["b", "c", "a"]


def test_lru_skip_passes_over_pinned() -> None:
    policy = LRUPolicy(clock)
    insert_all(policy, "abcd")
    assert policy.victim(skip=lambda k: k in {"a", "b"}) == "c"
    assert drain(policy) == ["a", "b", "c", "d"]  # skipping changed nothing


def test_lru_is_not_scan_resistant() -> None:
    """The contrast for ARC below: a scan flushes LRU's hot set."""
    policy = LRUPolicy(clock)
    hot = ["h0", "h1", "h2", "h3"]
    evicted = run_cache(policy, [*hot, *hot, *(f"s{i}" for i in range(10))], capacity=8)
    assert evicted == ["h0", "h1", "h2", "h3", "s0", "s1"]


# -- LFU --------------------------------------------------------------------------------------


def test_lfu_frequency_order() -> None:
    policy = LFUPolicy(clock)
    insert_all(policy, "abc")  # a=1 b=1 c=1
    policy.access("c")
    policy.access("c")  # c=3
    policy.access("a")  # a=2
    assert [policy.frequency(k) for k in "abc"] == [2, 1, 3]
    assert drain(policy) == ["b", "a", "c"]


def test_lfu_ties_go_to_least_recently_used() -> None:
    policy = LFUPolicy(clock)
    insert_all(policy, "abcd")
    policy.access("b")  # b reaches 2 first ...
    policy.access("a")  # ... then a: among the 2s, b is less recent
    assert drain(policy) == ["c", "d", "b", "a"]


def test_lfu_reinsert_after_remove_starts_over() -> None:
    policy = LFUPolicy(clock)
    policy.insert("a")
    for _ in range(3):
        policy.access("a")
    policy.remove("a")
    insert_all(policy, "ab")
    policy.access("b")
    assert [policy.frequency(k) for k in "ab"] == [1, 2]
    assert drain(policy) == ["a", "b"]


def test_lfu_skip_falls_through_to_next_frequency() -> None:
    policy = LFUPolicy(clock)
    insert_all(policy, "abc")
    policy.access("c")
    assert policy.victim(skip=lambda k: k in {"a", "b"}) == "c"
    assert policy.victim(skip=lambda k: k == "a") == "b"


# -- ARC --------------------------------------------------------------------------------------


def test_arc_twice_hit_key_outlives_one_hit_keys() -> None:
    policy = ARCPolicy(clock)
    insert_all(policy, "ab")
    policy.access("a")  # T1=[b] T2=[a]
    insert_all(policy, "cd")  # T1=[b,c,d]; LRU would now evict b, a, c, d
    assert drain(policy) == ["b", "c", "d", "a"]


def test_arc_ghost_hits_move_target() -> None:
    policy = ARCPolicy(clock)
    insert_all(policy, "ab")
    assert policy.victim() == "a"
    policy.remove("a")  # B1=[a]
    policy.insert("a")  # B1 hit: p = 0 + max(1, |B2|/|B1| = 0) = 1; a enters T2
    assert policy.target_t1 == 1.0
    policy.insert("c")  # T1=[b,c] T2=[a]
    # |T1|=2 > p=1 -> b; then |T1|=1 is not > 1 -> T2's a before T1's c.
    assert drain(policy) == ["b", "a", "c"]
    # Ghosts now: B1=[b,c], B2=[a]. A B2 hit shrinks p by max(1, 2/1) = 2, floored at 0.
    policy.insert("a")
    assert policy.target_t1 == 0.0
    assert "a" in policy
    assert "b" not in policy


def test_arc_scan_does_not_evict_hot_set() -> None:
    policy = ARCPolicy(clock)
    hot = ["h0", "h1", "h2", "h3"]
    scan = [f"s{i}" for i in range(100)]
    evicted = run_cache(policy, [*hot, *hot, *scan], capacity=8)
    # The hot keys sit in T2; one-hit scan keys churn through T1, oldest first.
    assert evicted == scan[:96]
    assert all(key in policy for key in hot)
    assert all(key in policy for key in scan[96:])


def test_arc_skip_falls_back_to_other_list() -> None:
    policy = ARCPolicy(clock)
    insert_all(policy, "abc")
    policy.access("c")  # T1=[a,b] T2=[c]
    assert policy.victim() == "a"
    assert policy.victim(skip=lambda k: k == "a") == "b"
    assert policy.victim(skip=lambda k: k in {"a", "b"}) == "c"


def test_arc_ghost_capacity_bounds_ghosts() -> None:
    policy = ARCPolicy(clock, ghost_capacity=1)
    insert_all(policy, "abc")
    drain(policy)  # B1 keeps only the newest ghost: c
    policy.insert("a")  # not a ghost any more: plain T1 insert, p unchanged
    assert policy.target_t1 == 0.0
    policy.insert("c")  # ghost hit
    assert policy.target_t1 == 1.0


# -- S3-FIFO ----------------------------------------------------------------------------------


def test_s3fifo_one_hit_wonders_leave_small_first() -> None:
    policy = S3FIFOPolicy(clock)
    insert_all(policy, "abcde")
    policy.access("b")
    policy.access("d")
    assert policy.victim() == "a"
    policy.remove("a")
    assert policy.queue_of("a") == "ghost"
    # S=[b,c,d,e]: b was read -> promoted to M, c was not -> victim.
    assert policy.victim() == "c"
    assert policy.queue_of("b") == "main"
    assert drain(policy) == ["c", "e", "b", "d"]


def test_s3fifo_key_read_in_small_moves_to_main_and_outlives_later_keys() -> None:
    policy = S3FIFOPolicy(clock)
    insert_all(policy, "ab")
    policy.access("a")
    insert_all(policy, "cdefghijkl")
    # LRU would go b, a, c, ...; S3-FIFO promotes a to M and drains S first.
    assert drain(policy) == ["b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "a"]


def test_s3fifo_ghost_reinsert_enters_main() -> None:
    policy = S3FIFOPolicy(clock)
    insert_all(policy, "abc")
    assert policy.victim() == "a"
    policy.remove("a")
    policy.insert("a")
    assert policy.queue_of("a") == "main"
    policy.insert("d")  # S=[b,c,d] M=[a]
    assert drain(policy) == ["b", "c", "d", "a"]


def test_s3fifo_main_counters_saturate_at_three() -> None:
    policy = S3FIFOPolicy(clock)
    insert_all(policy, "abc")
    drain(policy)  # G=[a,b,c]
    insert_all(policy, "abc")  # all to M with frequency 0
    assert [policy.queue_of(k) for k in "abc"] == ["main", "main", "main"]
    for _ in range(5):
        policy.access("a")  # saturates at 3
    for _ in range(3):
        policy.access("b")  # 3
    # c has 0 -> first. Then a and b each need 3 reinsertions; a is older in M, so it goes
    # first. Unbounded counters would have kept a (5) past b (3).
    assert drain(policy) == ["c", "a", "b"]


def test_s3fifo_victim_is_remembered_until_something_changes() -> None:
    policy = S3FIFOPolicy(clock)
    keys = [f"m{i}" for i in range(10)]
    insert_all(policy, keys)
    for key in keys:
        policy.remove(key)  # leaving S -> ghosts
    insert_all(policy, keys)  # M=[m0..m9], frequency 0
    insert_all(policy, "xy")
    policy.access("x")
    # |S|=2 >= 10% of 12: scan S, promote x, pick y. Afterwards |S|=1 < 1.2, so a fresh
    # choice would come from M; the remembered victim keeps the answer stable.
    assert policy.victim() == "y"
    assert policy.queue_of("x") == "main"
    assert policy.victim() == "y"
    policy.remove("y")
    assert policy.victim() == "m0"
    policy.access("m0")  # the remembered victim was read: choose again
    assert policy.victim() == "m1"


def test_s3fifo_pinned_key_is_passed_over_and_requeued() -> None:
    policy = S3FIFOPolicy(clock)
    insert_all(policy, "abc")
    assert policy.victim(skip=lambda k: k == "a") == "b"
    # a went to the back of S while pinned, so c now goes before it.
    assert drain(policy) == ["b", "c", "a"]
