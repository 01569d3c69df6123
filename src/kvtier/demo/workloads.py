"""The demo's workloads, as lists of token-id prompts.

* ``chat``: a shared system prompt, several users, several rounds; every turn resends the user's
  whole history (system prompt + earlier questions and answers) plus a new question.
* ``docqa``: long documents, each asked several questions (document first, question last).
* ``rag``: a pool of passages; each request is an instruction, k of them in random order and a
  question. Passages recur at other positions, so prefix caching reuses little; the ``with``
  variant blends them (``kvtier.blend``: ``Request.segments`` marks each passage).
* ``context``: one long prompt per length (e.g. 8k/16k/32k), asked again unchanged: the
  full-prefill vs full-hit comparison for long contexts.

Prompts are concatenations of separately tokenised pieces, so each turn's prompt is an exact
token-level extension of the previous one (tokenising the joined text could merge tokens across
a piece boundary and break the shared prefix, as a real chat template's fixed separators avoid).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.config import ConfigError
from kvtier.demo.corpus import paragraph, question, sentence

Encode = Callable[[str], list[int]]


@dataclass
class Request:
    workload: str
    label: str  # e.g. "user 2, round 3"
    ids: torch.Tensor  # 1-D int64 token ids
    repeat: int = 1  # measure this many times and report the median (long-context timing)
    segments: list[tuple[int, int]] | None = None  # rag: each passage's [start, end) in ``ids``


def make_encoder(tokenizer: Any | None, vocab_size: int) -> Encode:
    """The model's tokenizer, or (models without one) a stable word -> id hash below ``vocab_size``."""
    if tokenizer is not None:
        return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)

    def by_words(text: str) -> list[int]:
        return [zlib.crc32(w.encode()) % vocab_size for w in text.replace("\n", " \n ").split(" ") if w]

    return by_words


def _text_of(
    encode: Encode, rng: random.Random, target_tokens: int, head: str = "", tail: str = ""
) -> list[int]:
    """``head`` + sentences + ``tail`` with at least ``target_tokens`` tokens."""
    parts: list[str] = []
    ids = encode(head + tail)
    while len(ids) < target_tokens:
        parts.append(sentence(rng))
        ids = encode(head + " ".join(parts) + tail)
    return ids


def chat(
    encode: Encode,
    *,
    users: int = 3,
    rounds: int = 4,
    system_tokens: int = 400,
    turn_tokens: int = 50,
    seed: int = 0,
) -> list[Request]:
    rng = random.Random(seed)
    system = _text_of(
        encode, rng, system_tokens, "System: You are the archive assistant of a small town. ", "\n"
    )
    history = [list(system) for _ in range(users)]
    out: list[Request] = []
    for r in range(rounds):
        for u in range(users):
            q = encode(f"User: {question(rng)} {paragraph(rng, 1)}\nAssistant:")
            prompt = history[u] + q
            out.append(
                Request("chat", f"user {u + 1}, round {r + 1}", torch.tensor(prompt, dtype=torch.long))
            )
            answer = _text_of(encode, rng, turn_tokens, " ", "\n")
            history[u] = prompt + answer
    return out


def docqa(
    encode: Encode, *, docs: int = 2, questions: int = 3, doc_tokens: int = 800, seed: int = 1
) -> list[Request]:
    rng = random.Random(seed)
    documents = [_text_of(encode, rng, doc_tokens, f"Document {d + 1}:\n", "\n") for d in range(docs)]
    out: list[Request] = []
    for q in range(questions):
        for d, doc in enumerate(documents):
            ask = encode(f"Question: {question(rng)}\nAnswer:")
            out.append(
                Request("docqa", f"doc {d + 1}, question {q + 1}", torch.tensor(doc + ask, dtype=torch.long))
            )
    return out


def rag(
    encode: Encode, *, pool: int = 6, k: int = 3, requests: int = 8, doc_tokens: int = 200, seed: int = 3
) -> list[Request]:
    """Requests of ``k`` distinct passages out of ``pool`` (random order), each marked as a segment."""
    if not 1 <= k <= pool or requests < 1:
        raise ConfigError(
            f"rag needs 1 <= k <= pool and requests >= 1, got k={k}, pool={pool}, requests={requests}"
        )
    rng = random.Random(seed)
    passages = [_text_of(encode, rng, doc_tokens, f"Passage {d + 1}: ", "\n") for d in range(pool)]
    head = encode("Answer the question using only the passages below.\n")
    out: list[Request] = []
    for i in range(requests):
        chosen = rng.sample(range(pool), k)
        ids, spans = list(head), []
        for d in chosen:
            spans.append((len(ids), len(ids) + len(passages[d])))
            ids += passages[d]
        ids += encode(f"Question: {question(rng)}\nAnswer:")
        label = f"request {i + 1}: passages {', '.join(str(d + 1) for d in chosen)}"
        out.append(Request("rag", label, torch.tensor(ids, dtype=torch.long), segments=spans))
    return out


def context(*, lengths: list[int], vocab_size: int, repeat: int = 3, seed: int = 2) -> list[Request]:
    """One prompt per length, asked twice: a miss (it gets stored), then the same prompt again
    ``repeat`` times (with kvtier: full hits; without: full prefills)."""
    out: list[Request] = []
    for n in lengths:
        g = torch.Generator().manual_seed(seed + n)
        ids = torch.randint(0, vocab_size, (n,), generator=g)  # long contexts: random ids, exactly n tokens
        out.append(Request("context", f"{n} tokens, first", ids))
        out.append(Request("context", f"{n} tokens, again", ids, repeat=repeat))
    return out
