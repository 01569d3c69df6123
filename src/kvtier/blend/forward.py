"""Selective recompute (CacheBlend) by driving a transformers decoder layer by layer.

Given a prompt whose KV rows are partly known — an exact cached prefix ``[0, prefix)`` and
re-rotated segment rows (``reused``) — compute the rest and fix the reused rows that matter:

1. Layers ``0..check_layer``: every non-prefix token is computed (so these layers are exactly a
   full prefill). At ``check_layer`` the fresh K/V of each reused token is compared with its
   cached row; the ``recompute_ratio`` share of reused tokens that deviate most is *selected*.
2. Layers after it: only the selected tokens, the tokens no cache had, and the last token run
   through the layer; their fresh K/V overwrite their rows, every other reused row stays cached.

``recompute_ratio=1.0`` selects every reused token: all layers compute all non-prefix tokens
over an exact prefix, i.e. a full prefill. ``recompute_ratio=0.0`` skips the check: reused rows
are used as cached in every layer (naive reuse) and only uncached tokens are computed.

Invariants:
* Each computed query attends to every key row at a position <= its own (an explicit additive
  causal mask over the whole prompt), whatever mix of cached and fresh rows those are.
* The last prompt token is always computed through every layer: logits come from it.
* Works with the ``eager`` and ``sdpa`` attention implementations (both take an additive 4-D
  mask); others are refused by ``check_blendable``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvtier.blend.plan import BlendError

DEFAULT_CHECK_LAYER = 1
"""CacheBlend/LMCache select at the second layer: deviations are already informative there and the
layers before it are the only ones every token pays for."""


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


class _RowCache:
    """Handed to each attention layer as its cache: writes the fresh rows of the tokens being computed
    into that layer's full-length K/V buffers and returns the buffers, so queries see the whole prompt."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.rows: torch.Tensor = torch.empty(0, dtype=torch.long)  # positions computed in this layer
        self.probe: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (layer, local idx, positions)
        self.deviation: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        if self.probe is not None and self.probe[0] == layer_idx:
            _, local, pos = self.probe
            self.deviation = _deviation(k[:, :, local], v[:, :, local], kb[:, :, pos], vb[:, :, pos])
        kb[:, :, self.rows] = k
        vb[:, :, self.rows] = v
        return kb, vb


def _deviation(k: torch.Tensor, v: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor) -> torch.Tensor:
    """Per-token squared K and V deviation ``[n]``, each relative to the cached rows' mean energy
    (keys and values have different scales; neither should drown the other)."""

    def rel(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        d = (new.float() - old.float()).pow(2).sum(dim=(0, 1, 3))
        return d / old.float().pow(2).sum(dim=(0, 1, 3)).mean().clamp_min(1e-12)

    return rel(k, k_old) + rel(v, v_old)


def _mask(rows: torch.Tensor, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, len(rows), seq]`` causal mask for queries at positions ``rows``."""
    allowed = torch.arange(seq, device=rows.device)[None, :] <= rows[:, None]
    m = torch.zeros(allowed.shape, dtype=dtype, device=rows.device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[None, None]


def blend_forward(
    model: Any,
    ids: torch.Tensor,
    kv: torch.Tensor,
    *,
    prefix: int,
    reused: torch.Tensor,
    recompute_ratio: float,
    check_layer: int = DEFAULT_CHECK_LAYER,
    cache: DynamicCache | None = None,
) -> BlendForward:
    """Run ``model`` over ``ids`` ``[1, S]`` reusing the known rows of ``kv`` ``[L, 2, S, H, D]``.

    ``kv``'s rows ``[0, prefix)`` are exact and rows where ``reused`` (bool ``[S]``) holds are
    re-rotated segment KV; other rows are ignored (computed). ``kv`` is not modified.
    ``cache``: an empty ``DynamicCache`` (or subclass) to fill with the result; a new one if ``None``.
    """
    base = model.model
    seq = int(ids.shape[1])
    n_layers = int(kv.shape[0])
    device = ids.device
    reused = reused.to(device, copy=True)
    reused[:prefix] = False
    reused[seq - 1] = False
    always = torch.ones(seq, dtype=torch.bool, device=device)
    always[:prefix] = False
    always &= ~reused
    keys = [kv[i, 0].transpose(0, 1).unsqueeze(0).clone() for i in range(n_layers)]  # [1, H, S, D]
    values = [kv[i, 1].transpose(0, 1).unsqueeze(0).clone() for i in range(n_layers)]
    rc = _RowCache(keys, values)
    n_reused = int(reused.sum())
    check = min(max(check_layer, 0), n_layers - 1)
    probe = recompute_ratio > 0.0 and n_reused > 0
    rows = torch.arange(prefix, seq, device=device) if probe else always.nonzero().squeeze(1)
    if probe:
        reused_rows = reused.nonzero().squeeze(1)
        rc.probe = (check, reused_rows - prefix, reused_rows)  # rows == prefix..seq-1 here
    h = base.embed_tokens(ids[:, rows])
    dtype = h.dtype
    mask = _mask(rows, seq, dtype)
    recomputed = 0
    for i, layer in enumerate(base.layers[:n_layers]):
        rc.rows = rows
        pos = rows[None]
        pe = base.rotary_emb(h, pos)
        h = layer(h, mask, pos, rc, use_cache=True, position_embeddings=pe)
        if probe and i == check:
            assert rc.deviation is not None
            n_sel = min(n_reused, round(recompute_ratio * n_reused))
            chosen = rc.probe[2][torch.topk(rc.deviation, n_sel).indices] if n_sel else rows[:0]  # type: ignore[index]
            recomputed = n_sel
            keep = always.clone()
            keep[chosen] = True
            new_rows = keep.nonzero().squeeze(1)
            h = h[:, new_rows - prefix]
            rows = new_rows
            mask = _mask(rows, seq, dtype)
            rc.probe = None
    h = base.norm(h[:, -1:])
    logits = model.lm_head(h)[:, -1]
    cache = DynamicCache(config=model.config) if cache is None else cache
    for i in range(n_layers):
        cache.update(keys[i], values[i], i)
    return BlendForward(logits, cache, recomputed, int(rows.numel()))
