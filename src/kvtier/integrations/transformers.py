"""Drop-in prefix caching for Hugging Face transformers causal LMs.

```python
from kvtier import CacheEngine
from kvtier.integrations import transformers as kvt

engine = CacheEngine()
out = kvt.generate(model, input_ids, engine, max_new_tokens=64)   # like model.generate
r = kvt.prefill(model, input_ids, engine)                         # lower level: logits + cache
r = kvt.prefill(model, ids, engine, segments=[(12, 400), (400, 790)], recompute_ratio=0.15)  # blend
```

With ``segments=`` (or ``separator=``, a token sequence that splits the prompt) the call blends
(``kvtier.blend``): each segment's KV is reused wherever it appears, re-rotated to its position,
and the ``recompute_ratio`` share of its tokens that deviate most is recomputed.

Each call: look the prompt up in kvtier, load the cached prefix into a ``KVTierCache`` (layer
by layer as the forward reaches each layer), run the model on the uncached suffix only, then
store the prompt's KV so the next request that shares the prefix skips it.

Invariants:
* At least one prompt token is always computed, even on a full hit: the model needs the last
  position's hidden state to produce logits (and ``generate`` feeds only uncached tokens).
* The engine is bound to the model's namespace (model id + weights digest, dtype, layers, KV
  heads, head dim) on first use. An engine bound to anything else is never read from or
  written to for this model: a warning, then a plain prefill (a miss, never wrong output).
* Keys carry what besides the tokens changes the KV (``hf_keys``): a digest of the weights and
  adapter state at call time (a LoRA merged, loaded or switched after binding is another key)
  and of extra model inputs (pixel values...); with those, only the tokens before the first
  multimodal placeholder are cached. A call with an input kvtier cannot key runs uncached and
  is counted (``CacheStats.uncacheable_requests``).
* Batches: rows of equal length without padding. Each row's prefix is looked up separately and
  the batch reuses the shortest hit (one cache length per batch). Padded batches raise
  ``NotImplementedError``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.chunk import dtype_from_name, dtype_name
from kvtier.engine import CacheEngine
from kvtier.integrations.hf_cache import (
    ChunkedLayerwiseKV,
    IntegrationError,
    KVTierCache,
    LayerwiseKV,
    ModelKVSpec,
    UnsupportedInputError,
    cache_to_kv,
    check_supported,
    model_kv_spec,
)
from kvtier.integrations.hf_keys import Uncacheable, adapter_identity, input_extras
from kvtier.keys import KeyExtras
from kvtier.models import cache_kwarg
from kvtier.transfer.packed_layerwise import PackedChunkedLayerwiseKV

log = logging.getLogger(__name__)

__all__ = [
    "IntegrationError",
    "KVTierCache",
    "PrefillResult",
    "bind_engine",
    "cache_kwarg",
    "generate",
    "prefill",
    "request_extras",
]


DECODE_HEADROOM = 256
"""Positions a ``prefill`` cache has room for past the prompt (a caller's first decode steps;
past them the layers grow by half, one copy)."""


def _generation_capacity(model: Any, seq: int, kwargs: dict[str, Any]) -> int:
    """Prompt + the tokens ``generate`` may add (``max_new_tokens``, else ``max_length``, from the
    call or the generation config), so its layers never grow; ``+ DECODE_HEADROOM`` if unknown."""
    gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    for source in (kwargs, vars(gc) if gc is not None else {}):
        new = source.get("max_new_tokens")
        if isinstance(new, int) and new >= 0:
            return seq + new
        total = source.get("max_length")
        if isinstance(total, int) and total > seq:
            return total
    return seq + DECODE_HEADROOM


@dataclass
class PrefillResult:
    """What ``prefill`` returns. ``ttft_s`` runs from the call to logits ready (store excluded)."""

    logits: torch.Tensor  # [batch, vocab]: the last prompt position
    cache: KVTierCache  # holds every prompt position; continue decoding with it
    prompt_tokens: int
    hit_tokens: int  # positions loaded from kvtier (at most prompt_tokens - 1)
    stored_tokens: int
    ttft_s: float
    load_s: float  # lookup + retrieve
    store_s: float
    segment_tokens: int = 0  # blend: positions loaded from segment chunks (re-rotated)
    recomputed_tokens: int = 0  # blend: of those, recomputed after the check layer

    @property
    def next_token(self) -> torch.Tensor:
        """Greedy next token per row, ``[batch, 1]``."""
        return self.logits.argmax(dim=-1, keepdim=True)


def bind_engine(engine: CacheEngine, model: Any, model_id: str | None = None) -> bool:
    """Bind ``engine`` to ``model``'s KV namespace; ``False`` if it is bound to another one.

    ``model_id`` > ``engine.config.model.model_id`` > the model config's ``_name_or_path``.
    """
    spec = _spec(model, model_id or engine.config.model.model_id or None)
    ns = engine.namespace
    if ns is None:
        engine.bind_model(
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
            spec.dtype,
            model_id=spec.model_id,
            kv_planes=spec.planes,
        )
        return True
    if _matches(ns, spec):
        return True
    log.warning(
        "kvtier: engine is bound to %s (%s, %s) but the model is %s (%s, %s); the cache is bypassed for it",
        ns.model_id,
        ns.kv_dtype,
        ns.kv_shape,
        spec.model_id,
        dtype_name(spec.dtype),
        (spec.num_layers, spec.num_kv_heads, spec.head_dim),
    )
    return False


def _spec(model: Any, model_id: str | None) -> ModelKVSpec:
    """``model_kv_spec``, memoised on the model per (id, dtype): the weights digest costs device syncs."""
    key = (model_id, next(model.parameters()).dtype)
    memo = getattr(model, "_kvtier_spec", None)
    if memo is not None and memo[0] == key:
        return memo[1]  # type: ignore[no-any-return]
    check_supported(model)
    spec = model_kv_spec(model, model_id)
    model._kvtier_spec = (key, spec)
    return spec


def _matches(ns: Any, spec: ModelKVSpec) -> bool:
    return (
        ns.model_id == spec.model_id
        and ns.kv_dtype == dtype_name(spec.dtype)
        and tuple(ns.kv_shape) == (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        and ns.kv_planes == spec.planes
    )


def _rows(input_ids: Any, attention_mask: Any, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise IntegrationError(
            f"input_ids must be a non-empty [batch, seq] integer tensor, got {tuple(ids.shape)}"
        )
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise UnsupportedInputError(
            "kvtier's transformers integration does not support padded batches yet: pass rows of equal "
            "length without padding, or call it once per prompt"
        )
    return ids.to(device=device, dtype=torch.long)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def request_extras(model: Any, **model_inputs: Any) -> KeyExtras:
    """The ``KeyExtras`` under which ``prefill``/``generate`` key ``model``'s KV for these inputs
    (for direct ``engine.lookup(tokens, extras=...)``); raises ``hf_keys.Uncacheable``."""
    return KeyExtras(
        adapter=adapter_identity(model),
        inputs=input_extras(model, torch.zeros(1, 0, dtype=torch.long), model_inputs).digest,
    )


def _request_keys(
    engine: CacheEngine, model: Any, rows_cpu: torch.Tensor, kwargs: dict[str, Any]
) -> tuple[KeyExtras, int] | None:
    """(extras, tokens per row that may be cached), or ``None`` (counted) when an input cannot be keyed."""
    try:
        inp = input_extras(model, rows_cpu, kwargs)
    except Uncacheable as e:
        engine.note_uncacheable()
        log.warning("kvtier: this call is not cached (neither loaded nor stored): %s", e)
        return None
    limit = int(rows_cpu.shape[1]) if inp.limit is None else inp.limit
    return KeyExtras(adapter=adapter_identity(model), inputs=inp.digest), limit


def _load_prefix(
    engine: CacheEngine,
    rows_cpu: torch.Tensor,
    device: torch.device,
    extras: KeyExtras | None = None,
    limit: int | None = None,
    latent_split: int | None = None,
) -> tuple[int, LayerwiseKV | None]:
    """The shared cached prefix length of the rows (<= len-1, <= ``limit``) and its KV, or ``(0, None)``."""
    seq = int(rows_cpu.shape[1])
    if seq < 2:
        return 0, None
    lim = seq if limit is None else min(limit, seq)
    # Only what loads faster than it recomputes (measured tier reads vs measured prefill rate).
    found = min(engine.lookup_by_cost(r[:lim], extras=extras) for r in rows_cpu)
    hit = min(found, seq - 1)
    if hit <= 0:
        return 0, None
    if device.type == "cuda":
        # Straight from the pinned pool to the GPU, layer by layer, overlapping the forward; under
        # a lossy kv_codec the packed bytes cross and are decoded there, layer group by group.
        codec = engine.kv_codec
        views = [engine.retrieve_chunks(r[:found], extras=extras, decode=codec is None) for r in rows_cpu]
        hit = min([hit] + [v.num_tokens for v in views])
        if hit <= 0 or any(not v.chunks for v in views):
            for v in views:
                v.release()
            return 0, None
        if codec is None:
            return hit, ChunkedLayerwiseKV(views, hit, device, latent_split=latent_split)
        ns = engine.namespace
        assert ns is not None  # bound: the lookup above found chunks
        shape = (
            ns.kv_shape[0],
            ns.kv_planes,
            engine.config.chunk.chunk_tokens,
            ns.kv_shape[1],
            ns.kv_shape[2],
        )
        dtype = dtype_from_name(ns.kv_dtype)
        return hit, PackedChunkedLayerwiseKV(
            views, hit, device, codec, shape, dtype, latent_split=latent_split
        )
    kvs = []
    for r in rows_cpu:
        # Ask for exactly the looked-up span: its chunk keys (a stored partial tail included) match.
        got = engine.retrieve(r[:found], device=device, extras=extras)
        if got.kv is None or got.num_tokens < hit:  # evicted or rejected since the lookup: a miss
            hit = min(hit, got.num_tokens)
            if hit <= 0:
                return 0, None
        kvs.append(got.kv)
    return hit, LayerwiseKV([kv[:, :, :hit] for kv in kvs], device, latent_split)  # type: ignore[index]


@torch.inference_mode()
def prefill(
    model: Any,
    input_ids: Any,
    engine: CacheEngine,
    *,
    model_id: str | None = None,
    store: bool = True,
    attention_mask: Any = None,
    segments: Any = None,
    separator: Any = None,
    recompute_ratio: float = 0.15,
    check_layer: int | Sequence[int] | None = None,
    segment_sink: int | str = 0,
) -> PrefillResult:
    """Prefill ``input_ids`` reusing kvtier's cached prefix; store the prompt's KV afterwards.

    ``segments`` (``[(start, end), ...]``) or ``separator`` (token ids) turn on blending for a
    single prompt row: see ``kvtier.blend``. ``recompute_ratio``, ``check_layer`` and
    ``segment_sink`` (the prompt tokens segments are computed after: 0, n or ``"head"``) tune it.
    """
    device = _model_device(model)
    t0 = time.perf_counter()
    ids = _rows(input_ids, attention_mask, device)
    rows_cpu = ids.cpu()
    seq = int(ids.shape[1])
    spans = _blend_spans(ids, segments, separator, recompute_ratio)
    bound = bind_engine(engine, model, model_id)
    # NOTE: when no tier could load anything faster than this prefill recomputes it (measured),
    # the request is keyed only after the forward, for its store: off the TTFT path.
    early = bound and (spans is not None or engine.worth_asking(seq))
    keys = _request_keys(engine, model, rows_cpu, {}) if early else None
    extras, limit = keys if keys is not None else (None, 0)
    if spans is not None and keys is not None:
        return _blend(
            model, ids, engine, spans, store, recompute_ratio, check_layer, t0, extras, segment_sink
        )
    split = _spec(model, model_id or engine.config.model.model_id or None).latent_split
    hit, prefix = _load_prefix(engine, rows_cpu, device, extras, limit, split) if keys else (0, None)
    t_load = time.perf_counter()
    cache = KVTierCache(model.config, prefix, capacity=seq + DECODE_HEADROOM)
    out = model(input_ids=ids[:, hit:], **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_first = time.perf_counter()
    if hit == 0 or device.type != "cuda":  # on CUDA a hit's forward also waits for its layer loads
        engine.note_prefill(int(ids.shape[0]) * (seq - hit), t_first - t_load)  # the rate loads must beat
    stored = 0
    if store and bound and not early:
        keys = _request_keys(engine, model, rows_cpu, {})
        extras = keys[0] if keys is not None else None
    if store and keys:
        kv_rows = [cache_to_kv(cache, seq, batch_index=b, latent_split=split) for b in range(ids.shape[0])]
        stored = sum(engine.store(r, kv, extras=extras) for r, kv in zip(rows_cpu, kv_rows))
    t_end = time.perf_counter()
    return PrefillResult(logits, cache, seq, hit, stored, t_first - t0, t_load - t0, t_end - t_first)


def _blend_spans(
    ids: torch.Tensor, segments: Any, separator: Any, ratio: float
) -> list[tuple[int, int]] | None:
    """Validated segment spans if the call asks for blending, else ``None`` (bad input raises)."""
    if segments is None and separator is None:
        return None
    from kvtier.blend import BlendError, check_ratio, check_segments, split_on_separator

    check_ratio(ratio)
    if segments is not None and separator is not None:
        raise BlendError("pass segments= or separator=, not both")
    if ids.shape[0] != 1:
        raise BlendError(
            f"blending takes one prompt row at a time, got a batch of {ids.shape[0]}: call prefill once per row"
        )
    if separator is not None:
        segments = split_on_separator(ids[0].cpu(), separator)
    return check_segments(segments, int(ids.shape[1]))


def _blend(
    model: Any,
    ids: torch.Tensor,
    engine: CacheEngine,
    spans: list[tuple[int, int]],
    store: bool,
    ratio: float,
    check_layer: int | Sequence[int] | None,
    t0: float,
    extras: Any = None,
    segment_sink: int | str = 0,
) -> PrefillResult:
    from kvtier.blend.forward import DEFAULT_CHECK_LAYER, check_blendable
    from kvtier.blend.prefill import blend_prefill
    from kvtier.blend.rope import rope_spec

    rope_spec(model)  # refuse a model that cannot be re-rotated (or run) before touching the cache
    check_blendable(model)
    # NOTE: plain DynamicLayers: blend hands each layer its own buffer's views (``_put_layer``)
    cache = KVTierCache(model.config, in_place=False)
    layer = DEFAULT_CHECK_LAYER if check_layer is None else check_layer
    r = blend_prefill(
        model,
        ids[0],
        engine,
        spans,
        cache,
        recompute_ratio=ratio,
        check_layer=layer,
        segment_sink=segment_sink,
        store=store,
        t0=t0,
        extras=extras,
    )
    return PrefillResult(
        r.logits,
        cache,
        int(ids.shape[1]),
        r.prefix_tokens + r.segment_tokens,
        r.stored_tokens,
        r.ttft_s,
        r.load_s,
        r.store_s,
        r.segment_tokens,
        r.recomputed_tokens,
    )


@torch.inference_mode()
def generate(
    model: Any,
    input_ids: Any,
    engine: CacheEngine,
    *,
    model_id: str | None = None,
    store: bool = True,
    store_generated: bool = False,
    attention_mask: Any = None,
    segments: Any = None,
    separator: Any = None,
    recompute_ratio: float = 0.15,
    check_layer: int | Sequence[int] | None = None,
    segment_sink: int | str = 0,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate(input_ids, **generate_kwargs)`` with kvtier prefix reuse.

    The cached prefix is loaded into the cache handed to ``generate``, which then feeds only the
    uncached tokens. Afterwards the prompt's KV is stored (``store``), or the prompt's and the
    generated tokens' (``store_generated``; the last generated token has no KV yet). Returns
    what ``model.generate`` returns. ``segments``/``separator``/``recompute_ratio``: as for
    ``prefill`` (blending); the blended cache minus its last position is handed to ``generate``,
    which recomputes that one token (its KV was computed fresh anyway) to start decoding.
    """
    given = sorted({"cache", "past_key_values"} & set(generate_kwargs))
    if given:
        raise IntegrationError(f"generate(): kvtier supplies the cache itself; do not pass {given[0]}")
    device = _model_device(model)
    ids = _rows(input_ids, attention_mask, device)
    rows_cpu = ids.cpu()
    seq = int(ids.shape[1])
    spans = _blend_spans(ids, segments, separator, recompute_ratio)
    bound = bind_engine(engine, model, model_id)
    early = bound and (spans is not None or engine.worth_asking(seq))  # as in prefill
    keys = _request_keys(engine, model, rows_cpu, generate_kwargs) if early else None
    extras, limit = keys if keys is not None else (None, 0)
    if spans is not None and keys is not None:
        cache = _blend(
            model,
            ids,
            engine,
            spans,
            store,
            recompute_ratio,
            check_layer,
            time.perf_counter(),
            extras,
            segment_sink,
        ).cache
        cache.crop(-1)  # drop the last position: generate recomputes it to start decoding
        return model.generate(
            ids, **{cache_kwarg(model): cache}, attention_mask=torch.ones_like(ids), **generate_kwargs
        )
    split = _spec(model, model_id or engine.config.model.model_id or None).latent_split
    _, prefix = _load_prefix(engine, rows_cpu, device, extras, limit, split) if keys else (0, None)
    cache = KVTierCache(model.config, prefix, capacity=_generation_capacity(model, seq, generate_kwargs))
    out = model.generate(
        ids, **{cache_kwarg(model): cache}, attention_mask=torch.ones_like(ids), **generate_kwargs
    )
    if store and bound and not early:
        keys = _request_keys(engine, model, rows_cpu, generate_kwargs)
        extras, limit = keys if keys is not None else (None, 0)
    if store and keys:
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        cache.finish_loading()
        n = min(cache.get_seq_length(), sequences.shape[1]) if store_generated else seq
        n = min(n, limit) if limit < seq else n  # nothing from the first placeholder on
        for b in range(ids.shape[0]):
            if n > 0:
                kv = cache_to_kv(cache, n, batch_index=b, latent_split=split)
                engine.store(sequences[b, :n].cpu(), kv, extras=extras)
    return out
