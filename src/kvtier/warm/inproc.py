"""Warming with the in-process transformers engine: each document's KV computed once and stored.

Two layouts, matching how requests will reuse the document:

* ``prefix``: the document as a prompt of its own (tokenized with the tokenizer's special tokens,
  as a request that starts with it would be), stored as prefix chunks via
  ``integrations.transformers.prefill``; a later prompt that starts with the document hits.
* ``segments``: the document's KV computed from position 0 with no context and stored in the
  segment key domain (``blend.SegmentStore``), tokenized without special tokens, as the
  document's span inside a RAG prompt is; a blended prefill (``kvt.prefill(segments=...)`` or
  ``separator=``) reuses it wherever the document appears.

Invariants:
* Resumable: a document whose tokens the engine already holds in full (``engine.lookup`` /
  ``SegmentStore.lookup``) is skipped without running the model; a partly stored one computes
  only the rest (prefix: the cached prefix is loaded, not recomputed).
* What is stored is exactly what a request would store: the same integration, keys and namespace.
* ``engine.flush()`` at the end: the report's bytes are in the tiers (durable where the config
  says durable) when ``warm`` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from kvtier.engine import CacheEngine
from kvtier.warm.corpus import Document, WarmError
from kvtier.warm.report import WarmReport, tier_deltas

MODES = ("prefix", "segments")


def encode(tokenizer: Any, text: str, mode: str, max_tokens: int) -> list[int]:
    """Token ids of a document as ``mode`` stores it (at most ``max_tokens``)."""
    ids = list(tokenizer(text, add_special_tokens=mode == "prefix")["input_ids"])
    return ids[:max_tokens] if max_tokens > 0 else ids


def warm(
    engine: CacheEngine,
    model: Any,
    tokenizer: Any,
    docs: Iterable[Document],
    *,
    mode: str = "prefix",
    model_id: str | None = None,
    max_tokens: int = 0,
    tick: Callable[[Document, int], None] | None = None,
) -> WarmReport:
    """Store the KV of every document of ``docs`` in ``engine``'s tiers; ``tick(doc, tokens)``
    after each one (the progress bar). ``max_tokens`` (0: the model's context) cuts long ones."""
    from kvtier.integrations import transformers as kvt

    if mode not in MODES:
        raise WarmError(f"--mode {mode!r}: choose prefix or segments")
    if tokenizer is None:
        raise WarmError("the model has no tokenizer — give a model directory with its tokenizer files")
    if not kvt.bind_engine(engine, model, model_id):
        raise WarmError("the engine is bound to another model — use a fresh engine (or the same model)")
    limit = max_tokens or int(getattr(model.config, "max_position_embeddings", 0) or 0)
    extras = kvt.request_extras(model)
    segments = None
    if mode == "segments":
        from kvtier.blend import SegmentStore, rope_spec

        rope_spec(model)  # a model that blending cannot re-rotate is refused before any work
        segments = SegmentStore(engine, extras)
    device = next(model.parameters()).device
    rep = WarmReport()
    engine.flush()
    before = engine.stats()
    t0 = time.perf_counter()
    for doc in docs:
        rep.documents += 1
        ids = encode(tokenizer, doc.text, mode, limit)
        if not ids:
            rep.skipped += 1
            continue
        if segments is None:
            if engine.lookup(ids, extras=extras) >= len(ids):
                rep.skipped += 1
            else:
                r = kvt.prefill(model, torch.tensor([ids], device=device), engine, model_id=model_id)
                rep.computed_tokens += len(ids) - r.hit_tokens
                rep.stored_tokens += r.stored_tokens
                rep.warmed += 1
                rep.tokens += len(ids)
        elif segments.lookup(ids) >= len(ids):
            rep.skipped += 1
        else:
            from kvtier.blend.prefill import segment_kv

            kv = segment_kv(model, torch.tensor(ids, device=device))
            rep.stored_tokens += segments.store(ids, kv.cpu())
            rep.computed_tokens += len(ids)
            rep.warmed += 1
            rep.tokens += len(ids)
        if tick is not None:
            tick(doc, len(ids))
    engine.flush()
    rep.seconds = time.perf_counter() - t0
    rep.tiers = tier_deltas(before, engine.stats())
    return rep
