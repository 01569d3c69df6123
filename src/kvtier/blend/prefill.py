"""One blended prefill: prefix chunks + re-rotated segments + selective recompute, then store.

Order of work for a prompt ``row`` with segments ``spans``:

1. The cached prefix (prefix chunk domain) is looked up and loaded as today: exact rows ``[0, p)``.
2. Each segment starting at or after ``p`` is read from the segment domain (``SegmentStore``); its
   cached leading run is re-rotated from positions ``0..`` to its place in the prompt.
3. ``blend_forward`` computes everything else and recomputes the ``recompute_ratio`` share of
   reused tokens that deviate most at the check layer.
4. Store (after the logits, outside TTFT): the prompt's *exact* rows as prefix chunks, and each
   segment that was not fully cached, computed on its own from position 0, as segment chunks.

Invariants:
* Prefix chunks only ever receive exact KV: rows before the first reused (approximate) row, or the
  whole prompt when nothing was reused or ``recompute_ratio == 1``. Blended KV never enters the
  prefix domain, so prefix reuse stays bit-for-bit a full prefill.
* Where the cached prefix ends inside a segment, the prefix's exact rows win and the segment's
  cached rows are used from there on.
* A cache failure anywhere (tier error, fingerprint mismatch) makes that part a miss; the tokens
  are computed, the request never fails because of the cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.blend.forward import (
    DEFAULT_CHECK_LAYER,
    DEFAULT_DEVIATION,
    KVBuffer,
    as_layers,
    blend_forward,
    check_blendable,
)
from kvtier.blend.load import SegmentLoad
from kvtier.blend.plan import BlendError, Span
from kvtier.blend.rope import rope_spec
from kvtier.blend.segments import SegmentStore
from kvtier.chunk import dtype_from_name
from kvtier.engine import CacheEngine
from kvtier.keys import KeyExtras
from kvtier.models import cache_kwarg
from kvtier.transfer.layerwise import cache_to_kv

DEFAULT_SINK_TOKENS = 1
"""Leading tokens of each reused segment always recomputed (out of the ratio's budget): computed on
its own, a segment's first token was the sequence start, which attention uses as a sink; reused
mid-prompt unfixed, it draws the attention of every later token away from the real context."""


DEFAULT_SEGMENT_SINK: int | str = 0
"""No sink by default: segments stored by ``kvtier warm --mode segments`` (which knows no prompt)
keep matching. ``"head"`` gave better agreement on SmolLM2 (RESULTS.md); pass it per call."""


@dataclass
class BlendOutcome:
    """What ``blend_prefill`` did; token counts are over the one prompt row."""

    logits: torch.Tensor  # [1, vocab]
    prefix_tokens: int  # exact rows loaded from prefix chunks
    segment_tokens: int  # rows loaded from segment chunks (re-rotated)
    recomputed_tokens: int  # of those, recomputed after the check layer
    stored_tokens: int  # prefix + segment tokens newly stored
    load_s: float  # from the call until the segment lookups are done and their copies started
    ttft_s: float  # from the call to logits ready
    store_s: float


def blend_prefill(
    model: Any,
    row: torch.Tensor,
    engine: CacheEngine,
    spans: list[Span],
    cache: Any,
    *,
    recompute_ratio: float,
    check_layer: int | Sequence[int] = DEFAULT_CHECK_LAYER,
    sink_tokens: int = DEFAULT_SINK_TOKENS,
    segment_sink: int | str = DEFAULT_SEGMENT_SINK,
    deviation: str = DEFAULT_DEVIATION,
    store: bool = True,
    t0: float | None = None,
    extras: KeyExtras | None = None,
    profile: dict[str, float] | None = None,
) -> BlendOutcome:
    """Prefill ``row`` ``[S]`` (on the model's device) with blending; fills ``cache`` (an empty
    transformers ``DynamicCache``) with every prompt position. ``spans`` are validated segments.
    ``extras``: the request's key extras (adapter identity, salt), folded into both key domains.
    ``segment_sink``: the prompt tokens each segment's KV is computed after (see
    ``sink_length``): ``0`` none (from position 0), ``n`` the first ``n``, ``"head"`` everything
    before the first segment. With a sink no segment start is forced (``sink_tokens``): its first
    token was not the sequence start.
    ``profile``: a dict receiving ``blend_forward``'s phase times (synchronises; breakdowns only).
    ``load_s`` covers the lookups and *starting* the segment copies: on CUDA they run on the side
    stream while the first layers compute (``SegmentLoad``); ``ttft_s`` includes all of it."""
    t0 = time.perf_counter() if t0 is None else t0
    check_blendable(model)
    spec = rope_spec(model)
    ns = engine.namespace
    assert ns is not None, "bind the engine to the model first"
    device = row.device
    seq = int(row.numel())
    row_cpu = row.cpu()
    layers, heads, dim = ns.kv_shape
    buf = KVBuffer(layers, heads, seq, dim, dtype_from_name(ns.kv_dtype), device)
    reused = torch.zeros(seq, dtype=torch.bool)
    force = torch.zeros(seq, dtype=torch.bool)
    load = SegmentLoad(buf, spec, device)
    try:
        found = engine.lookup(row_cpu, extras=extras)
        prefix = min(found, seq - 1)
        if prefix > 0:
            # Ask for exactly the looked-up span: a stored partial tail chunk is keyed by its own end.
            got = engine.retrieve(row_cpu[:found], device=device, extras=extras)
            prefix = min(prefix, got.num_tokens)
            if got.kv is not None and prefix > 0:
                buf.put(slice(None), 0, got.kv[:, :, :prefix])
            else:
                prefix = 0
        n_sink = sink_length(segment_sink, spans)
        segments = SegmentStore(engine, extras, row_cpu[:n_sink])
        missing: list[Span] = []
        seg_tokens = 0
        t_load = 0.0

        def lookup_segments() -> None:
            """Find each segment's cached run, hand its chunks to ``load`` and mark the rows; run by
            ``blend_forward`` as ``prepare`` (on a GPU, while the first layers compute)."""
            nonlocal seg_tokens, t_load
            for s, e in spans:
                if e <= prefix:
                    continue  # inside the exact prefix
                n = 0
                lo = max(
                    prefix, s
                )  # NOTE: a prefix may end inside a segment (documents sharing a first token)
                for off, chunk in segments.chunks(row_cpu[s:e]):
                    end = off + int(chunk.num_tokens)
                    n = end
                    if s + end <= lo:
                        chunk.release()  # wholly inside the exact prefix
                        continue
                    skip = max(0, lo - (s + off))
                    load.add(chunk, skip, n_sink + off + skip, s + off + skip)
                if s + n > lo:
                    reused[lo : s + n] = True
                    if lo == s and not n_sink:  # NOTE: cached at position 0, its first tokens were its sink
                        force[s : min(s + n, s + sink_tokens)] = True
                    seg_tokens += s + n - lo
                if n < e - s:
                    missing.append((s, e))
            load.start(_first_cached_layer(recompute_ratio, check_layer, layers))
            t_load = time.perf_counter() - t0

        out = blend_forward(
            model,
            row[None],
            buf,
            prefix=prefix,
            reused=reused,
            recompute_ratio=recompute_ratio,
            check_layer=check_layer,
            force=force,
            deviation=deviation,
            cache=cache,
            fill=load.fill,
            prepare=lookup_segments,
            profile=profile,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        load.finish()
    t_first = time.perf_counter()

    stored = 0
    if store:
        first_reused = int(reused.nonzero()[0]) if seg_tokens else seq
        exact_end = seq if recompute_ratio >= 1.0 else first_reused
        if exact_end > 0:
            stored += engine.store(row_cpu[:exact_end], cache_to_kv(cache, exact_end), extras=extras)
        for s, e in missing:
            stored += segments.store(row_cpu[s:e], segment_kv(model, row[s:e], row[:n_sink]))
    t_end = time.perf_counter()
    return BlendOutcome(
        out.logits, prefix, seg_tokens, out.recomputed, stored, t_load, t_first - t0, t_end - t_first
    )


def _first_cached_layer(ratio: float, check_layer: int | Sequence[int], layers: int) -> int:
    """The first layer whose cached rows ``blend_forward`` reads (as it computes it): the first check
    layer when it selects, layer 0 for naive reuse."""
    if ratio <= 0.0:
        return 0
    return min(min(max(c, 0), layers - 1) for c in as_layers(check_layer))


def sink_length(segment_sink: int | str, spans: Sequence[Span]) -> int:
    """How many leading prompt tokens are the segments' sink; a ``BlendError`` for a bad value or
    a sink that reaches into a segment (its KV would depend on itself)."""
    if segment_sink == "head":
        return spans[0][0] if spans else 0
    if isinstance(segment_sink, str) or int(segment_sink) < 0:
        raise BlendError(f"segment_sink must be 'head' or a token count >= 0, got {segment_sink!r}")
    n = int(segment_sink)
    if spans and n > spans[0][0]:
        raise BlendError(
            f"segment_sink={n} reaches into the segment starting at {spans[0][0]}: use at most "
            f"{spans[0][0]} (or 'head')"
        )
    return n


@torch.inference_mode()
def segment_kv(model: Any, tokens: torch.Tensor, sink: torch.Tensor | None = None) -> torch.Tensor:
    """A segment's KV ``[L, 2, n, H, D]`` computed on its own: from position 0, or after the
    ``sink`` tokens (positions ``len(sink)..``; the sink's own rows are dropped)."""
    from transformers import DynamicCache

    k = 0 if sink is None else int(sink.numel())
    ids = tokens if not k else torch.cat([sink.to(tokens.device), tokens])  # type: ignore[union-attr]
    c = DynamicCache(config=model.config)
    model(input_ids=ids[None], **{cache_kwarg(model): c}, use_cache=True, logits_to_keep=1)
    return cache_to_kv(c, int(ids.numel()))[:, :, k:]
