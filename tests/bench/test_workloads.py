"""Workloads: deterministic for a seed, and the reuse structure each one claims, computed from the
token streams themselves (not from the generators' own metadata)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import pytest

from kvtier.bench import workloads as W
from kvtier.bench.workloads import Encode

SMALL = {
    "chat": dict(users=2, rounds=3, system_tokens=80, turn_tokens=20),
    "docqa": dict(docs=2, doc_tokens=80, questions=2),
    "rag": dict(pool=5, doc_tokens=40, k=2, requests=5),
    "pressure": dict(capacity_tokens=128, context_tokens=48, passes=2),
}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def find_all(seq: Sequence[int], sub: Sequence[int]) -> list[int]:
    m = len(sub)
    return [i for i in range(len(seq) - m + 1) if seq[i] == sub[0] and tuple(seq[i : i + m]) == tuple(sub)]


@pytest.mark.parametrize("name", W.NAMES)
def test_same_seed_same_tokens_other_seed_other_tokens(encode: Encode, name: str) -> None:
    a = W.build(name, encode, seed=3, **SMALL[name])
    b = W.build(name, encode, seed=3, **SMALL[name])
    c = W.build(name, encode, seed=4, **SMALL[name])
    assert [r.prompt for r in a.requests] == [r.prompt for r in b.requests]
    assert [r.answer for r in a.requests] == [r.answer for r in b.requests]
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]
    assert all(len(r.prompt) > 0 and r.max_tokens == 8 for r in a.requests)


def test_chat_every_turn_resends_the_previous_turn_and_its_answer(encode: Encode) -> None:
    users, rounds, system = 3, 4, 120
    w = W.chat(encode, users=users, rounds=rounds, system_tokens=system, turn_tokens=20)
    reqs = w.requests
    assert len(reqs) == users * rounds
    for r in reqs:
        if r.depends_on is None:
            continue
        prev = reqs[r.depends_on]
        resent = prev.prompt + prev.answer
        assert r.prompt[: len(resent)] == resent and len(r.prompt) > len(resent)
    # from the streams alone: each user's prompts form a chain of strict prefixes
    by_user: dict[str, list[tuple[int, ...]]] = {}
    for r in reqs:
        by_user.setdefault(r.group, []).append(r.prompt)
    assert len(by_user) == users
    for chain in by_user.values():
        assert len(chain) == rounds
        for a, b in itertools.pairwise(chain):
            assert common_prefix(a, b) == len(a) < len(b)
    # every prompt starts with the shared system prompt; users diverge right after it
    firsts = [chain[0] for chain in by_user.values()]
    shared = min(common_prefix(firsts[0], p) for p in firsts[1:])
    assert system <= shared < system + 8
    assert all(common_prefix(firsts[0], r.prompt) >= system for r in reqs)


def test_chat_random_order_with_private_documents(encode: Encode) -> None:
    """A fleet's chat: each user's long private document right after the system prompt, turns of
    different users interleaved in a seeded random order, each user's own turns still in order."""
    users, rounds, system, private = 4, 5, 40, 200
    kw = dict(users=users, rounds=rounds, system_tokens=system, turn_tokens=10, private_tokens=private)
    w = W.chat(encode, turn_order="random", seed=1, **kw)
    reqs = w.requests
    assert len(reqs) == users * rounds
    groups = [r.group for r in reqs]
    assert groups != [f"user{u + 1}" for _ in range(rounds) for u in range(users)]  # not round-major
    assert groups != [r.group for r in W.chat(encode, turn_order="random", seed=2, **kw).requests]
    by_user: dict[str, list[W.Request]] = {}
    for i, r in enumerate(reqs):
        if r.depends_on is not None:
            assert r.depends_on < i and reqs[r.depends_on].group == r.group
            resent = reqs[r.depends_on].prompt + reqs[r.depends_on].answer
            assert r.prompt[: len(resent)] == resent
        by_user.setdefault(r.group, []).append(r)
    assert all(len(v) == rounds for v in by_user.values())
    for v in by_user.values():
        assert [r.label.rsplit(" ", 1)[1] for r in v] == [str(n + 1) for n in range(rounds)]
    # users share only the system prompt: their private documents diverge at once
    firsts = [v[0].prompt for v in by_user.values()]
    assert all(len(p) >= system + private for p in firsts)
    shared = max(common_prefix(a, b) for a, b in itertools.combinations(firsts, 2))
    assert system <= shared < system + 8
    # the same turns, whatever the order: random order only reorders round-major's requests
    rm = W.chat(encode, turn_order="rounds", seed=1, **kw).requests
    assert sorted(r.prompt for r in rm) == sorted(r.prompt for r in reqs)
    with pytest.raises(W.WorkloadError, match="turn_order"):
        W.chat(encode, turn_order="shuffled")


def test_docqa_questions_share_their_document_as_prefix(encode: Encode) -> None:
    docs, t, q = 3, 150, 3
    w = W.docqa(encode, docs=docs, doc_tokens=t, questions=q, order="random")
    assert len(w.requests) == docs * q and all(len(d) == t for d in w.documents)
    for a in w.requests:
        for b in w.requests:
            if a is b:
                continue
            n = common_prefix(a.prompt, b.prompt)
            if a.prompt[:t] == b.prompt[:t]:
                assert n >= t
            else:
                assert n < 8  # "Document k:" differs within the first tokens
    assert len({r.prompt[:t] for r in w.requests}) == docs
    assert len({r.prompt for r in w.requests}) == docs * q  # every question differs


def test_docqa_orders(encode: Encode) -> None:
    docs, t, q = 3, 60, 3

    def seq(order: str) -> list[int]:
        w = W.docqa(encode, docs=docs, doc_tokens=t, questions=q, order=order)
        ids = {d: i for i, d in enumerate(w.documents)}
        return [ids[r.prompt[:t]] for r in w.requests]  # which document, read from the tokens

    tiled, inter, rnd = seq("tiled"), seq("interleaved"), seq("random")
    assert tiled == [d for d in range(docs) for _ in range(q)]
    assert inter == [d for _ in range(q) for d in range(docs)]
    assert sorted(rnd) == sorted(tiled) and rnd not in (tiled, inter)


def test_rag_documents_recur_at_non_prefix_positions(encode: Encode) -> None:
    w = W.rag(encode, pool=6, doc_tokens=60, k=3, requests=10)
    offsets: dict[int, set[int]] = {}
    seen: set[int] = set()
    any_position = prefix = 0
    for i, r in enumerate(w.requests):
        found = []
        for d, doc in enumerate(w.documents):
            pos = find_all(r.prompt, doc)
            assert len(pos) <= 1
            if pos:
                found.append((pos[0], d))
                offsets.setdefault(d, set()).add(pos[0])
        assert len(found) == 3
        assert tuple(d for _, d in sorted(found)) == r.docs
        assert [r.prompt[s:e] for s, e in r.segments] == [w.documents[d] for d in r.docs]  # blend spans
        any_position += sum(len(w.documents[d]) for _, d in found if d in seen)
        prefix += max((common_prefix(r.prompt, e.prompt) for e in w.requests[:i]), default=0)
        seen.update(d for _, d in found)
    assert any(len(o) > 1 for o in offsets.values())  # a document reappears at another position
    # most reusable tokens are not on a shared prefix: prefix caching can reuse little of them
    assert any_position > 0 and prefix < any_position / 2, (prefix, any_position)


def lru_prefix_hits(prompts: list[tuple[int, ...]], capacity_tokens: int | None, block: int = 16) -> int:
    """Tokens a block-granular LRU prefix cache of ``capacity_tokens`` would reuse (None: unbounded)."""
    cache: OrderedDict[tuple[int, ...], None] = OrderedDict()
    hits = 0
    for p in prompts:
        keys = [p[: (i + 1) * block] for i in range(len(p) // block)]
        n = 0
        while n < len(keys) and keys[n] in cache:
            n += 1
        hits += n * block
        for k in keys:
            cache[k] = None
            cache.move_to_end(k)
            while capacity_tokens is not None and len(cache) * block > capacity_tokens:
                cache.popitem(last=False)
    return hits


def test_pressure_working_set_exceeds_the_capacity(encode: Encode) -> None:
    cap, ctx, passes = 256, 64, 3
    w = W.pressure(encode, capacity_tokens=cap, context_tokens=ctx, oversubscribe=1.5, passes=passes)
    prompts = [r.prompt for r in w.requests]
    contexts = {p[:ctx] for p in prompts}  # the working set, read from the tokens
    assert len(contexts) * ctx > cap and len(contexts) == w.params["contexts"]
    assert len(prompts) == passes * len(contexts)
    assert lru_prefix_hits(prompts, cap) == 0  # an engine cache of that size never hits
    assert lru_prefix_hits(prompts, None) >= (passes - 1) * len(contexts) * (
        ctx // 16 * 16
    )  # a larger one does


def test_bad_sizes_raise_clear_errors(hash_encode: Encode) -> None:
    with pytest.raises(W.WorkloadError, match="k <= pool"):
        W.rag(hash_encode, pool=2, k=3)
    with pytest.raises(W.WorkloadError, match="oversubscribe"):
        W.pressure(hash_encode, oversubscribe=1.0)
    with pytest.raises(W.WorkloadError, match="passes"):
        W.pressure(hash_encode, passes=1)
    with pytest.raises(W.WorkloadError, match="order"):
        W.docqa(hash_encode, order="sideways")
    with pytest.raises(W.WorkloadError, match="unknown workload"):
        W.build("video", hash_encode)
    with pytest.raises(W.WorkloadError, match="heading"):
        W.docqa(hash_encode, doc_tokens=1)
