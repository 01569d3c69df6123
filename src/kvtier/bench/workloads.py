"""Seeded benchmark workloads, as token-id prompts in the target model's tokenizer.

* ``chat``: N users, R rounds, one shared system prompt; every turn resends the user's whole
  history (system prompt + optional private document + earlier questions + simulated answers)
  plus a new question; turns round-major or interleaved in a seeded random order.
* ``docqa``: D documents of exactly T tokens, each asked Q questions (document first), in
  ``tiled`` (all questions of doc 1, then doc 2 ...), ``interleaved`` (question 1 of every doc,
  then question 2 ...) or ``random`` order.
* ``rag``: a pool of documents; each request is a short instruction, k distinct random documents
  in random order, and a question. Documents recur but mostly *not* at the start, so prefix
  caching reuses little: the case CacheBlend-style non-prefix reuse is for.
* ``pressure``: W contexts of T tokens visited cyclically, ``passes`` times, with
  W * T > ``capacity_tokens`` (the engine's own prefix cache). The reuse distance of every
  context exceeds that capacity, so an LRU cache of that size never hits, a bigger tier does.

Invariants (checked by ``tests/bench``, computed from the token streams):
* Same arguments and seed => the same token ids, in every process.
* Prompts are concatenations of separately tokenised pieces, so a piece (system prompt,
  document, history) has the same ids wherever it appears: chat turn r's prompt starts with
  turn r-1's prompt + answer exactly, and a RAG document is the same ids at any position.
  (Tokenising the joined text could merge tokens across a boundary; real chat templates put
  fixed separators there for the same reason.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvtier.demo.corpus import question, sentence
from kvtier.errors import KVTierError

Encode = Callable[[str], list[int]]
ORDERS = ("random", "tiled", "interleaved")
NAMES = ("chat", "docqa", "rag", "pressure")
CHAT_ORDERS = ("rounds", "random")


class WorkloadError(KVTierError, ValueError):
    """A workload was asked for with sizes that cannot produce the stated structure."""


@dataclass(frozen=True)
class Request:
    """One completion request. ``prompt`` holds token ids; the target decodes ``max_tokens``."""

    workload: str
    label: str  # e.g. "user 2, round 3"
    prompt: tuple[int, ...]
    max_tokens: int
    group: str = ""  # user / document / context the request belongs to
    answer: tuple[int, ...] = ()  # chat: the simulated reply the next turn resends
    depends_on: int | None = None  # index of the request this prompt extends (chat history)
    docs: tuple[int, ...] = ()  # docqa/rag/pressure: documents in the prompt, in order
    segments: tuple[tuple[int, int], ...] = ()  # rag: each document's [start, end) in ``prompt``


@dataclass
class Workload:
    name: str
    params: dict[str, Any]
    requests: list[Request]
    documents: list[tuple[int, ...]] = field(default_factory=list)  # docqa/rag/pressure pieces

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise WorkloadError(what)


def text_tokens(encode: Encode, rng: random.Random, n: int, head: str = "") -> tuple[int, ...]:
    """``head`` + corpus sentences, cut to exactly ``n`` tokens (``n`` >= tokens of ``head``)."""
    ids = encode(head)
    _check(len(ids) <= n, f"{n} tokens cannot hold the heading {head!r} ({len(ids)} tokens)")
    words: list[str] = []
    body: list[int] = []
    while len(ids) + len(body) < n:
        # ~15 tokens per sentence: encode in batches, not once per sentence (quadratic otherwise)
        words.extend(sentence(rng) for _ in range(max(1, (n - len(ids) - len(body)) // 12)))
        body = encode(" " + " ".join(words))
    return tuple(ids + body)[:n]


def chat(
    encode: Encode,
    *,
    users: int = 4,
    rounds: int = 3,
    system_tokens: int = 300,
    turn_tokens: int = 60,
    max_tokens: int = 8,
    seed: int = 0,
    private_tokens: int = 0,
    turn_order: str = "rounds",
) -> Workload:
    """Round-major (``turn_order="rounds"``: round 1 of every user, then round 2 ...) or
    ``"random"``: every user's turns in their own order, users interleaved in a seeded random order
    (a fleet's traffic; the same user may come twice in a row). ``private_tokens`` > 0 gives each
    user a private document of that many tokens after the system prompt (a pasted file: the long,
    per-user context that makes *where* a user's turn runs matter)."""
    _check(users >= 1 and rounds >= 1, "chat needs users >= 1 and rounds >= 1")
    _check(private_tokens >= 0, f"chat: private_tokens must be >= 0, got {private_tokens}")
    _check(turn_order in CHAT_ORDERS, f"chat: turn_order must be one of {CHAT_ORDERS}, got {turn_order!r}")
    rng = random.Random(f"chat:{seed}")
    system = text_tokens(encode, rng, system_tokens, "System: You are the archive assistant of a small town.")
    sep = tuple(encode("\n"))
    history = [system + sep for _ in range(users)]
    if private_tokens:
        # NOTE: own generators, so the default (no private documents) keeps its token ids.
        for u in range(users):
            doc = text_tokens(
                encode, random.Random(f"chat:{seed}:doc{u}"), private_tokens, f"Document {u + 1}:"
            )
            history[u] += doc + sep
    turns: list[list[tuple[tuple[int, ...], tuple[int, ...]]]] = [[] for _ in range(users)]
    for _r in range(rounds):
        for u in range(users):
            q = tuple(encode(f"User: {question(rng)} {sentence(rng)}\nAssistant:"))
            answer = text_tokens(encode, rng, turn_tokens) + sep
            turns[u].append((history[u] + q, answer))
            history[u] = history[u] + q + answer
    order = [u for _r in range(rounds) for u in range(users)]
    if turn_order == "random":
        random.Random(f"chat-order:{seed}").shuffle(order)
    out: list[Request] = []
    last: list[int | None] = [None] * users
    taken = [0] * users  # each user's turns stay in their own order
    for u in order:
        r = taken[u]
        taken[u] += 1
        prompt, answer = turns[u][r]
        out.append(
            Request(
                "chat",
                f"user {u + 1}, round {r + 1}",
                prompt,
                max_tokens,
                f"user{u + 1}",
                answer=answer,
                depends_on=last[u],
            )
        )
        last[u] = len(out) - 1
    params = dict(
        users=users,
        rounds=rounds,
        system_tokens=system_tokens,
        turn_tokens=turn_tokens,
        seed=seed,
        private_tokens=private_tokens,
        turn_order=turn_order,
    )
    return Workload("chat", params, out)


def order_pairs(docs: int, questions: int, order: str, rng: random.Random) -> list[tuple[int, int]]:
    """(document, question) pairs in ``order``."""
    _check(order in ORDERS, f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "tiled":
        return [(d, q) for d in range(docs) for q in range(questions)]
    pairs = [(d, q) for q in range(questions) for d in range(docs)]
    if order == "random":
        rng.shuffle(pairs)
    return pairs


def docqa(
    encode: Encode,
    *,
    docs: int = 3,
    doc_tokens: int = 1000,
    questions: int = 3,
    order: str = "random",
    max_tokens: int = 8,
    seed: int = 0,
) -> Workload:
    _check(docs >= 1 and questions >= 1, "docqa needs docs >= 1 and questions >= 1")
    rng = random.Random(f"docqa:{seed}")
    documents = [text_tokens(encode, rng, doc_tokens, f"Document {d + 1}:\n") for d in range(docs)]
    asks = [
        [tuple(encode(f"\nQuestion: {question(rng)}\nAnswer:")) for _ in range(questions)] for _ in documents
    ]
    out = [
        Request(
            "docqa",
            f"doc {d + 1}, question {q + 1}",
            documents[d] + asks[d][q],
            max_tokens,
            f"doc{d + 1}",
            docs=(d,),
        )
        for d, q in order_pairs(docs, questions, order, rng)
    ]
    params = dict(docs=docs, doc_tokens=doc_tokens, questions=questions, order=order, seed=seed)
    return Workload("docqa", params, out, documents)


def rag(
    encode: Encode,
    *,
    pool: int = 8,
    doc_tokens: int = 300,
    k: int = 3,
    requests: int = 12,
    max_tokens: int = 8,
    seed: int = 0,
) -> Workload:
    _check(1 <= k <= pool, f"rag needs 1 <= k <= pool, got k={k}, pool={pool}")
    _check(requests >= 1, "rag needs requests >= 1")
    rng = random.Random(f"rag:{seed}")
    documents = [text_tokens(encode, rng, doc_tokens, f"[{d + 1}] ") for d in range(pool)]
    head = tuple(encode("Answer the question using only the passages below.\n"))
    sep = tuple(encode("\n"))
    out: list[Request] = []
    for i in range(requests):
        chosen = tuple(rng.sample(range(pool), k))
        body: tuple[int, ...] = head
        spans: list[tuple[int, int]] = []
        for d in chosen:
            spans.append((len(body), len(body) + len(documents[d])))
            body += documents[d] + sep
        ask = tuple(encode(f"Question: {question(rng)}\nAnswer:"))
        out.append(
            Request("rag", f"request {i + 1}", body + ask, max_tokens, "", docs=chosen, segments=tuple(spans))
        )
    params = dict(pool=pool, doc_tokens=doc_tokens, k=k, requests=requests, seed=seed)
    return Workload("rag", params, out, documents)


def pressure(
    encode: Encode,
    *,
    capacity_tokens: int = 2048,
    context_tokens: int = 512,
    oversubscribe: float = 1.5,
    passes: int = 2,
    max_tokens: int = 8,
    seed: int = 0,
) -> Workload:
    """ceil(oversubscribe * capacity / context) contexts (>= 2, and their total > capacity), cyclic."""
    _check(
        oversubscribe > 1.0,
        f"pressure needs oversubscribe > 1 (a working set larger than the cache), got {oversubscribe}",
    )
    _check(passes >= 2, "pressure needs passes >= 2 (one pass has nothing to reuse)")
    _check(context_tokens >= 16 and capacity_tokens >= 1, "pressure needs context_tokens >= 16")
    contexts = max(2, math.ceil(oversubscribe * capacity_tokens / context_tokens))
    if contexts * context_tokens <= capacity_tokens:
        contexts += 1
    rng = random.Random(f"pressure:{seed}")
    documents = [text_tokens(encode, rng, context_tokens, f"Context {c + 1}:\n") for c in range(contexts)]
    out = []
    for p in range(passes):
        for c, doc in enumerate(documents):
            ask = tuple(encode(f"\nQuestion: {question(rng)}\nAnswer:"))
            out.append(
                Request(
                    "pressure",
                    f"pass {p + 1}, context {c + 1}",
                    doc + ask,
                    max_tokens,
                    f"ctx{c + 1}",
                    docs=(c,),
                )
            )
    params = dict(
        capacity_tokens=capacity_tokens,
        context_tokens=context_tokens,
        contexts=contexts,
        working_set_tokens=contexts * context_tokens,
        passes=passes,
        seed=seed,
    )
    return Workload("pressure", params, out, documents)


def build(name: str, encode: Encode, **kwargs: Any) -> Workload:
    """The workload ``name`` with its own keyword arguments (unknown names raise ``WorkloadError``)."""
    makers: dict[str, Callable[..., Workload]] = {
        "chat": chat,
        "docqa": docqa,
        "rag": rag,
        "pressure": pressure,
    }
    if name not in makers:
        raise WorkloadError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}")
    return makers[name](encode, **kwargs)
