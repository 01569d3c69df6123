"""Selective recompute (CacheBlend) by driving a transformers decoder layer by layer.

Given a prompt whose KV rows are partly known — an exact cached prefix ``[0, prefix)`` and
re-rotated segment rows (``reused``) — compute the rest and fix the reused rows that matter:

1. Layers before ``check_layer``: every non-prefix token is computed (so these layers are exactly
   a full prefill). At ``check_layer`` the K/V of every non-prefix token are computed (a probe
   pass that stops the layer after its K/V projections, ``_probe_kv``) and each reused token's
   are compared with its cached row; the ``recompute_ratio`` share of reused tokens that deviate
   most is *selected*, and the check layer's attention and MLP run for those rows only (what
   they would have computed for the others was discarded anyway). The check layer's K/V rows
   are all fresh.
2. Layers after it: only the selected tokens, the tokens no cache had, and the last token run
   through the layer; their fresh K/V overwrite their rows, every other reused row stays cached.

With several check layers (``check_layer=[1, 2, 3]``) the selection narrows layer by layer
(gradual filtering, ``_stage_ratios``). Rows in ``force`` (each reused segment's first token:
cached at position 0 it was an attention sink) are recomputed first, out of the same budget.

``recompute_ratio=1.0`` selects every reused token: all layers compute all non-prefix tokens
over an exact prefix, i.e. a full prefill. ``recompute_ratio=0.0`` skips the check: reused rows
are used as cached in every layer (naive reuse) and only uncached tokens are computed.

Invariants:
* Each computed query attends to every key row at a position <= its own, whatever mix of cached
  and fresh rows those are. How that is expressed (``_attn_mask``): a contiguous run of queries
  ending at the last position (the layers that compute every token) takes SDPA's own causal
  path (``is_causal`` from position 0, ``causal_lower_right`` after an exact prefix: flash
  kernels, no mask in memory); any other set of queries (the selected rows) flex attention with
  a block mask built from their positions (``flex.SelectedRows``; on CUDA by default) or an
  additive ``[n_rows, S]`` mask. ``eager`` attention always gets the explicit mask. A flex
  failure recomputes that layer with the additive mask (``_run_layer``): never a failed request.
* One KV buffer (``KVBuffer``, ``[L, 2, 1, H, S, D]``): computed rows are written into it in
  place, and the returned cache's layers are views of it (no copy of the prompt's KV).
* Cached rows a ``fill`` callback provides must be in the buffer before the layer that reads
  them runs: ``blend_forward`` calls ``fill(layer, first)`` before each layer ``>= first``, where
  ``first`` is the first check layer (earlier layers recompute every row) or 0 (naive reuse);
  layers before ``first`` are never filled, so their freshly computed rows stay.
* Tokens outside every reused span (the system text, uncached segments, the question) are
  computed in every layer with full attention; only reused rows are ever skipped.
* Deviations compare fresh and cached keys at the same (new) position: cached keys are
  re-rotated before the forward pass, so RoPE does not count as deviation.
* The last prompt token is always computed through every layer: logits come from it.
* Works with the ``eager`` and ``sdpa`` attention implementations; others are refused by
  ``check_blendable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvtier.blend import flex
from kvtier.blend.plan import BlendError

DEFAULT_CHECK_LAYER = 1
"""CacheBlend/LMCache select at the second layer: deviations are already informative there and the
layers before it are the only ones every token pays for."""

DEFAULT_DEVIATION = "kv"
"""K and V deviation: on SmolLM2-135M (50 questions) K-only (LMCache's choice) gave +0.02 F1 but
lower agreement with full prefill (exact match 0.18 vs 0.22, KL 0.435 vs 0.427); see RESULTS.md."""
DEVIATIONS = ("k", "v", "kv")


def check_blendable(model: Any) -> None:
    """Refuse models the layer driver cannot run exactly (attention kind, sliding windows)."""
    cfg = model.config.get_text_config(decoder=True)
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa"):
        raise BlendError(f"blending needs attn_implementation 'eager' or 'sdpa', the model uses {impl!r}")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        raise BlendError(f"{cfg.model_type}: sliding-window attention ({window}) cannot be blended")
    base = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            raise BlendError(f"{cfg.model_type}: model.model has no {name!r}; not a Llama-style decoder")


@dataclass
class BlendForward:
    """What ``blend_forward`` computed: logits of the last position and a full cache."""

    logits: torch.Tensor  # [1, vocab]
    cache: DynamicCache  # every prompt position, every layer
    recomputed: int  # reused tokens recomputed after the check layer
    computed: int  # tokens computed in the last layer (recomputed + uncached + the last one)
    attention: str = "mask"  # how the last layer attended: "causal", "flex" or "mask" (dense)


class KVBuffer:
    """The prompt's KV, one buffer ``[L, 2, 1, H, S, D]``: ``keys(i)``/``values(i)`` are layer ``i``'s
    ``[1, H, S, D]`` views in the layout attention reads, so rows are written in place and the
    finished cache hands out views, never copies. Contents start undefined: every row is either
    provided (prefix, ``fill``) or computed before a query can read it (see ``blend_forward``)."""

    def __init__(
        self, layers: int, heads: int, seq: int, dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.buf = torch.empty((layers, 2, 1, heads, seq, dim), dtype=dtype, device=device)

    @classmethod
    def from_kv(cls, kv: torch.Tensor) -> KVBuffer:
        """A buffer holding a copy of ``kv`` ``[L, 2, S, H, D]``."""
        layers, _, seq, heads, dim = kv.shape
        b = cls(layers, heads, seq, dim, kv.dtype, kv.device)
        b.buf[:, :, 0] = kv.transpose(2, 3)
        return b

    @property
    def layers(self) -> int:
        return int(self.buf.shape[0])

    def keys(self, i: int) -> torch.Tensor:
        return self.buf[i, 0]

    def values(self, i: int) -> torch.Tensor:
        return self.buf[i, 1]

    def put(self, layers: slice, start: int, kv: torch.Tensor) -> None:
        """Write ``kv`` ``[l, 2, n, H, D]`` into rows ``[start, start + n)`` of ``layers``."""
        n = int(kv.shape[2])
        self.buf[layers, :, 0, :, start : start + n] = kv.transpose(2, 3)

    def put_plane(self, layers: slice, plane: int, start: int, x: torch.Tensor) -> None:
        """Write keys (``plane`` 0) or values (1) ``x`` ``[l, n, H, D]`` into rows ``[start, start + n)``."""
        n = int(x.shape[1])
        self.buf[layers, plane, 0, :, start : start + n] = x.transpose(1, 2)


Fill = Callable[[int, int], None]
"""``fill(layer, first)``: make the cached rows of ``layer`` (and of any layers ``>= first`` it
chooses to do at once) present in the buffer; never touch layers below ``first``."""


class _RowCache:
    """Handed to each attention layer as its cache: writes the fresh rows of the tokens being computed
    into that layer's full-length K/V buffers and returns the buffers, so queries see the whole prompt."""

    def __init__(self, buf: KVBuffer) -> None:
        self.buf = buf
        self.rows: torch.Tensor | slice = slice(None)  # positions computed in this layer
        self.probe: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (layer, local idx, positions)
        self.deviation: torch.Tensor | None = None
        self.kind = DEFAULT_DEVIATION
        self.stop = False  # a probe pass: end the layer once its K/V are written (``_probe_kv``)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.buf.keys(layer_idx), self.buf.values(layer_idx)
        if self.probe is not None and self.probe[0] == layer_idx:
            _, local, pos = self.probe
            self.deviation = _deviation(
                k[:, :, local], v[:, :, local], kb[:, :, pos], vb[:, :, pos], self.kind
            )
        kb[:, :, self.rows] = k
        vb[:, :, self.rows] = v
        if self.stop:
            raise _KVWritten
        return kb, vb


class _KVWritten(Exception):  # control flow only: never escapes ``_probe_kv``
    """Raised by ``_RowCache.update`` in a probe pass: the layer's K/V are in the buffer, the rest of
    the layer (attention, MLP) is not wanted."""


def _probe_kv(layer: Any, h: torch.Tensor, mask: Any, pos: torch.Tensor, rc: _RowCache, pe: Any) -> None:
    """Run ``layer`` over ``h`` only as far as its keys and values: ``rc.update`` writes them for
    ``rc.rows`` (taking the check's deviations first) and ends the call. A check layer's attention
    and MLP then run for the rows it selects alone, not for every row (their outputs for the rows
    it drops were never used): the check layer costs its K/V projections plus a selected layer.
    Relies on what ``_RowCache`` relies on anyway: attention calls ``cache.update`` before it
    attends."""
    rc.stop = True
    try:
        layer(h, mask, pos, rc, use_cache=True, position_embeddings=pe)
    except _KVWritten:
        return
    finally:
        rc.stop = False
    raise BlendError("the decoder layer never called its cache's update(); this model cannot be blended")


def _deviation(
    k: torch.Tensor, v: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, kind: str = "kv"
) -> torch.Tensor:
    """Per-token squared deviation ``[n]``: ``"k"`` keys only (LMCache), ``"v"`` values only, ``"kv"``
    both, each relative to the cached rows' mean energy (keys and values have different scales)."""

    def rel(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        d = (new.float() - old.float()).pow(2).sum(dim=(0, 1, 3))
        return d / old.float().pow(2).sum(dim=(0, 1, 3)).mean().clamp_min(1e-12)

    if kind == "k":
        return rel(k, k_old)
    if kind == "v":
        return rel(v, v_old)
    return rel(k, k_old) + rel(v, v_old)


def _mask(rows: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, len(rows), seq]`` causal mask for queries at positions ``rows``."""
    allowed = torch.arange(seq, device=rows.device)[None, :] <= rows[:, None]
    m = torch.zeros(allowed.shape, dtype=dtype, device=rows.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[None, None]


def _attn_mask(
    rows: torch.Tensor,
    seq: int,
    dtype: torch.dtype,
    impl: str,
    tail_start: int | None = None,
    kernel: flex.Kernel | None = None,
) -> Any:
    """The attention mask for queries at ``rows`` (sorted) over keys ``[0, seq)``.

    SDPA with queries ``[start, seq)``: ``None`` from 0 (transformers then passes ``is_causal``),
    a lower-right ``CausalBias`` after a prefix (keys ``[0, seq)``, query ``j`` at ``start + j``):
    both reach the flash / memory-efficient kernels without a mask in memory. Any other rows with
    a flex ``kernel`` (SDPA only) that serves their size (``flex.serves``): a ``flex.SelectedRows``
    block mask. Anything else, and every
    ``eager`` layer: the explicit additive mask. ``tail_start``: the caller knows ``rows`` is
    ``[tail_start, seq)`` (no device read, so no synchronisation)."""
    n = int(rows.numel())
    contiguous = tail_start == seq - n if tail_start is not None else n > 0 and int(rows[0]) == seq - n
    if impl == "sdpa" and contiguous:
        if n == seq:
            return None
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(n, seq)
    if impl == "sdpa" and kernel is not None and n and flex.serves(kernel, n, seq):
        return flex.SelectedRows(rows, seq, kernel)
    return _mask(rows, seq, dtype)


def _attention_kind(mask: Any) -> str:
    if isinstance(mask, flex.SelectedRows):
        return "flex"
    return "mask" if type(mask) is torch.Tensor else "causal"  # None or a CausalBias: SDPA causal


def _run_layer(
    layer: Any, h: torch.Tensor, mask: Any, pos: torch.Tensor, rc: _RowCache, pe: Any, rows: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """One decoder layer over the rows ``rows`` (positions ``pos``); returns its output and the mask
    the next layers should use. A failure on a flex mask (compile error, a kernel the device lacks,
    an attention function that never reached flex) disables flex (one warning) and recomputes the
    layer with the additive mask: ``h`` is unchanged and the rows the failed call may have written
    are rewritten with the same values (a check's deviations were taken before, by ``_probe_kv``).
    Out of memory is not a flex fault and is raised."""
    try:
        return layer(h, mask, pos, rc, use_cache=True, position_embeddings=pe), mask
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # any flex fault degrades to the dense mask, logged once (no pass)
        if not isinstance(mask, flex.SelectedRows):
            raise
        flex.disable(exc)
        dense = _mask(rows, mask.seq, h.dtype)
        return layer(h, dense, pos, rc, use_cache=True, position_embeddings=pe), dense


def _stage_ratios(ratio: float, stages: int) -> list[float]:
    """Share of reused tokens kept after each check layer: ``ratio`` at the last one, and a wider
    net before it (``stages - j`` times ``ratio`` at stage ``j``), narrowed layer by layer as in
    CacheBlend's gradual filtering: a token is recomputed only if it deviates at every check."""
    return [min(1.0, ratio * (stages - j)) for j in range(stages)]


class _Phases:
    """Wall time per phase when ``profile`` is a dict (synchronising the device at each boundary,
    so only for breakdowns; the timed runs pass ``None`` and never synchronise)."""

    def __init__(self, profile: dict[str, float] | None, device: torch.device) -> None:
        self.profile, self.device = profile, device
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.profile is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.profile[name] = self.profile.get(name, 0.0) + now - self.t
        self.t = now


@torch.no_grad()  # inference only: rows are written in place into one buffer
def blend_forward(
    model: Any,
    ids: torch.Tensor,
    kv: torch.Tensor | KVBuffer,
    *,
    prefix: int,
    reused: torch.Tensor,
    recompute_ratio: float,
    check_layer: int | Sequence[int] = DEFAULT_CHECK_LAYER,
    force: torch.Tensor | None = None,
    deviation: str = DEFAULT_DEVIATION,
    cache: DynamicCache | None = None,
    fill: Fill | None = None,
    prepare: Callable[[], None] | None = None,
    profile: dict[str, float] | None = None,
    attention: str = "auto",
) -> BlendForward:
    """Run ``model`` over ``ids`` ``[1, S]`` reusing the known rows of ``kv``.

    ``kv``: a ``[L, 2, S, H, D]`` tensor (copied once into a ``KVBuffer``; not modified) or a
    ``KVBuffer`` (used and written in place). Its rows ``[0, prefix)`` are exact and rows where
    ``reused`` (bool ``[S]``) holds are re-rotated segment KV, present already or brought by
    ``fill`` (see ``Fill``); other rows are ignored (computed).
    ``check_layer``: one layer, or several (gradual filtering, see ``_stage_ratios``).
    ``force`` (bool ``[S]``): reused rows recomputed whenever ``recompute_ratio > 0`` (a segment's
    first tokens), taken out of the ``recompute_ratio`` budget first; the rest of the budget goes
    to the rows with the largest ``deviation`` (``"k"``, ``"v"`` or ``"kv"``).
    ``cache``: an empty ``DynamicCache`` (or subclass) to fill with the result; a new one if ``None``.
    ``prepare``: called once before ``reused``/``force`` are first read, which it may fill in
    place: before the first check layer when selecting (the layers before it compute every
    non-prefix row whatever is reused, so the caller's segment lookups overlap them on a GPU),
    before layer 0 for naive reuse. No reused row after it: every layer computes every row.
    ``profile``: a dict that receives seconds per phase (``prepare``, ``fill``,
    ``all_token_layers``, ``selected_layers``, ``head``); synchronises the device, so for
    breakdowns only.
    ``attention``: how layers with non-contiguous query rows attend (``flex.ATTENTIONS``):
    ``"auto"`` flex on CUDA with ``sdpa`` once its kernel is built (``flex.auto_kernel``: the mask
    until then, never a compile inside a request), the mask elsewhere; ``"flex"`` flex wherever
    it imports (CPU: its eager reference; compiled in the call if need be), ``"mask"`` the
    additive mask.
    """
    base = model.model
    seq = int(ids.shape[1])
    buf = kv if isinstance(kv, KVBuffer) else KVBuffer.from_kv(kv)
    n_layers = buf.layers
    device = ids.device
    phases = _Phases(profile, device)
    impl = getattr(model.config.get_text_config(decoder=True), "_attn_implementation", None) or "eager"
    if deviation not in DEVIATIONS:
        raise BlendError(f"deviation must be one of {DEVIATIONS}, got {deviation!r}")
    kernel: flex.Kernel | None = None
    if flex.wanted(attention, device, impl):
        flex.install()
        kernel = flex.kernel(device) if attention == "flex" else flex.auto_kernel(_flex_signature(model, buf))
    checks = sorted({min(max(c, 0), n_layers - 1) for c in as_layers(check_layer)})
    stage_ratio = dict(zip(checks, _stage_ratios(recompute_ratio, len(checks)), strict=True))
    rc = _RowCache(buf)
    rc.kind = deviation
    selecting_mode = recompute_ratio > 0.0
    plan: _Plan | None = None
    if selecting_mode:  # every non-prefix row through the first check layer: reused is not needed yet
        first_cached = checks[0]
        rows = torch.arange(prefix, seq, device=device)
        rc.rows = slice(prefix, seq)
    else:
        first_cached = 0
        if prepare is not None:
            prepare()
        plan = _Plan(reused, force, prefix, seq, 0.0, device)
        rows = plan.always.nonzero().squeeze(1)
        rc.rows = _as_index(rows, seq)
    h = base.embed_tokens(ids[:, rows])
    dtype = h.dtype
    mask = _attn_mask(rows, seq, dtype, impl, tail_start=prefix if selecting_mode else None, kernel=kernel)
    pos = rows[None]
    pe = base.rotary_emb(h, pos)  # recomputed only when the rows change
    selecting = False
    for i, layer in enumerate(base.layers[:n_layers]):
        if plan is None and i == first_cached:
            phases.mark("all_token_layers")
            if prepare is not None:
                prepare()
            plan = _Plan(reused, force, prefix, seq, recompute_ratio, device)
            phases.mark("prepare")
        if fill is not None and plan is not None and i >= first_cached and plan.n_reused:
            phases.mark("selected_layers" if selecting else "all_token_layers")
            fill(i, first_cached)
            phases.mark("fill")
        if selecting_mode and plan is not None and plan.n_reused and i in stage_ratio:
            # The check: this layer's K/V for the current rows, the selection, then the layer
            # itself for the selected rows only (see ``_probe_kv``).
            n_forced, cand = plan.n_forced, plan.cand
            n_keep = max(0, min(int(cand.numel()), round(stage_ratio[i] * plan.n_reused) - n_forced))
            if n_keep < int(cand.numel()):  # otherwise every candidate stays: nothing to compare
                if n_keep:
                    rc.probe = (i, torch.searchsorted(rows, cand), cand)
                    _probe_kv(layer, h, mask, pos, rc, pe)
                    assert rc.deviation is not None
                    plan.cand = cand[torch.topk(rc.deviation, n_keep).indices.sort().values]
                    rc.probe, rc.deviation = None, None
                else:
                    plan.cand = cand[:0]
                keep = plan.fixed.clone()
                keep[plan.cand] = True
                new_rows = keep.nonzero().squeeze(1)
                h = h[:, torch.searchsorted(rows, new_rows)]
                rows = new_rows
                mask = _attn_mask(rows, seq, dtype, impl, kernel=kernel)
                rc.rows = _as_index(rows, seq)
                pos = rows[None]
                pe = base.rotary_emb(h, pos)
            if not any(c > i for c in checks):
                phases.mark("all_token_layers")
                selecting = True
        h, used = _run_layer(layer, h, mask, pos, rc, pe, rows)
        if used is not mask:  # a flex fault: the dense mask for this request's later selections too
            mask, kernel = used, None
    phases.mark("selected_layers" if selecting else "all_token_layers")
    assert plan is not None
    recomputed = plan.n_forced + int(plan.cand.numel()) if selecting_mode and plan.n_reused else 0
    h = base.norm(h[:, -1:])
    logits = model.lm_head(h)[:, -1]
    cache = DynamicCache(config=model.config) if cache is None else cache
    for i in range(n_layers):
        _put_layer(cache, buf.keys(i), buf.values(i), i)
    phases.mark("head")
    return BlendForward(logits, cache, recomputed, int(rows.numel()), _attention_kind(mask))


def _flex_signature(model: Any, buf: KVBuffer) -> flex.Signature:
    """The flex kernel's specialisation for this model's selected layers (see ``flex.Signature``)."""
    _, _, _, heads, _, dim = buf.buf.shape
    return _signature(
        model, int(heads), int(dim), buf.buf.dtype, buf.buf.device, torch.is_inference_mode_enabled()
    )


def _signature(
    model: Any, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, inference: bool
) -> flex.Signature:
    cfg = model.config.get_text_config(decoder=True)
    scale = getattr(getattr(model.model.layers[0], "self_attn", None), "scaling", None)
    return flex.Signature(
        device=str(device),
        dtype=dtype,
        q_heads=int(cfg.num_attention_heads),
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=float(scale) if scale is not None else None,
        inference=inference,
    )


def warm_flex(model: Any, timeout: float | None = 600.0) -> bool:
    """Build the flex kernel ``attention="auto"`` will use for ``model``'s blends through
    ``kvt.prefill`` (inference mode), before requests arrive; ``False`` off CUDA, where ``auto``
    never uses flex, or if the build failed (blends then use the dense mask)."""
    cfg = model.config.get_text_config(decoder=True)
    p = next(model.parameters())
    impl = getattr(cfg, "_attn_implementation", None) or "eager"
    if not flex.wanted("auto", p.device, impl):
        return False
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return flex.warm_up(_signature(model, kv_heads, head_dim, p.dtype, p.device, True), timeout)


class _Plan:
    """Which rows are reused, forced and still candidates (``blend_forward``'s selection state)."""

    def __init__(
        self,
        reused: torch.Tensor,
        force: torch.Tensor | None,
        prefix: int,
        seq: int,
        ratio: float,
        device: torch.device,
    ) -> None:
        reused = reused.to(device, copy=True)
        reused[:prefix] = False
        reused[seq - 1] = False
        always = torch.ones(seq, dtype=torch.bool, device=device)
        always[:prefix] = False
        always &= ~reused
        self.always = always
        self.n_reused = int(reused.sum())
        budget = min(self.n_reused, round(ratio * self.n_reused))
        forced = torch.zeros(seq, dtype=torch.bool, device=device)
        if ratio > 0.0 and self.n_reused and force is not None:
            forced = force.to(device) & reused
            over = int(forced.sum()) - budget
            if over > 0:  # NOTE: a ratio too small for every forced row: keep the earliest ones
                forced[forced.nonzero().squeeze(1)[budget:]] = False
        self.n_forced = int(forced.sum())
        self.fixed = always | forced  # computed in every layer
        self.cand = (reused & ~forced).nonzero().squeeze(1)  # reused rows still in the running


def _as_index(rows: torch.Tensor, seq: int) -> torch.Tensor | slice:
    """``rows`` as a slice when it is the contiguous tail ``[start, seq)`` (a view write, not a scatter)."""
    n = int(rows.numel())
    if n and int(rows[0]) == seq - n and int(rows[-1]) == seq - 1:
        return slice(seq - n, seq)
    return rows


def _put_layer(cache: Any, k: torch.Tensor, v: torch.Tensor, i: int) -> None:
    """Hand layer ``i``'s buffer views to ``cache``: a plain ``DynamicLayer`` takes them as its tensors
    (its ``update`` would ``cat`` them onto an empty tensor, a copy of the whole prompt's KV)."""
    cache.update(k[:, :, :0], v[:, :, :0], i)  # initialises the layer (dtype, device)
    layer = cache.layers[i] if hasattr(cache, "layers") else None
    if layer is not None and type(layer).__name__ == "DynamicLayer" and layer.keys.numel() == 0:
        layer.keys, layer.values = k, v
    else:
        cache.update(k, v, i)


def as_layers(check_layer: int | Sequence[int]) -> list[int]:
    layers = [int(check_layer)] if isinstance(check_layer, int) else [int(c) for c in check_layer]
    if not layers:
        raise BlendError("check_layer needs at least one layer index")
    return layers
