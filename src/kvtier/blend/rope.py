"""RoPE re-rotation of cached keys with the model's own rotary tables (scaling included).

Cached keys are stored after RoPE: ``k = s * R(p) k_raw`` where ``R(p)`` rotates pair ``i`` of
``(k[i], k[i + D/2])`` by ``p * inv_freq[i]`` and ``s`` is the rope's attention scaling (YaRN's
mscale, 1 elsewhere). A segment computed at positions ``0..n-1`` and reused at ``P..P+n-1``
needs ``R(P + j) R(j)^-1 k``: one rotation by the angle difference, the scaling cancels.

Why the model's tables and not a closed form: the frequencies a rope config produces (linear,
llama3, YaRN: each rescales ``inv_freq`` its own way) live in the model's rotary module; taking
``cos``/``sin`` of ``p * inv_freq`` exactly as transformers does (float32 product, float32
cos/sin) and combining old and new angles in float64 gives the keys the model itself would
have computed at the new position, to float32 rounding.

Invariants:
* Only static rope types are re-rotated (``SUPPORTED_ROPE_TYPES``). Dynamic NTK and LongRoPE
  change their frequencies with the sequence length, partial rotary leaves some dimensions
  unrotated, multimodal rope has several position axes: each is refused with a ``BlendError``,
  never blended with wrong positions.
* ``rerotate_keys`` returns a new tensor; values and the cached tensor are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvtier.blend.plan import BlendError

SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class RopeSpec:
    """A model's static rotary frequencies: ``inv_freq`` ``[D/2]`` float32, on the model's device."""

    inv_freq: torch.Tensor
    rope_type: str

    @property
    def head_dim(self) -> int:
        return int(self.inv_freq.numel()) * 2


def rope_spec(model: Any) -> RopeSpec:
    """The re-rotation spec of a transformers causal LM, or a ``BlendError`` saying why it has none."""
    cfg = model.config.get_text_config(decoder=True)
    mtype = getattr(cfg, "model_type", "?")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise BlendError(
            f"{mtype}: blending supports {sorted(SUPPORTED_MODEL_TYPES)} (full-attention RoPE decoders); "
            "this model's position encoding is not known to be re-rotatable, use prefix caching only"
        )
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise BlendError(f"{mtype}: partial rotary embeddings cannot be re-rotated by kvtier yet")
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    if rotary is None or not isinstance(inv, torch.Tensor):
        raise BlendError(f"{mtype}: the model has no rotary embedding module with inv_freq; cannot re-rotate")
    rtype = getattr(rotary, "rope_type", "default")
    if not isinstance(rtype, str) or rtype not in SUPPORTED_ROPE_TYPES:
        raise BlendError(
            f"{mtype}: rope type {rtype!r} cannot be re-rotated (its frequencies depend on the sequence length "
            f"or it is not a plain rotation); supported: {sorted(SUPPORTED_ROPE_TYPES)}"
        )
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    if inv.numel() * 2 != head_dim:
        raise BlendError(
            f"{mtype}: rotary frequencies cover {inv.numel() * 2} of {head_dim} head dims (partial rotary); "
            "cannot re-rotate"
        )
    return RopeSpec(inv.detach().to(torch.float32), rtype)


def _angles(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, D/2]`` exactly as transformers' rotary forward computes them (float32)."""
    freqs = pos.to(torch.float32)[:, None] * inv_freq.to(device=pos.device, dtype=torch.float32)[None, :]
    return freqs.cos(), freqs.sin()


def delta_tables(
    spec: RopeSpec, old_pos: torch.Tensor, new_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, D/2]`` (float64) of ``angle(new) - angle(old)`` from the model's own float32 tables."""
    co, so = (t.to(torch.float64) for t in _angles(old_pos, spec.inv_freq))
    cn, sn = (t.to(torch.float64) for t in _angles(new_pos, spec.inv_freq))
    return cn * co + sn * so, sn * co - cn * so


def rerotate_keys(
    k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, spec: RopeSpec
) -> torch.Tensor:
    """``k`` ``[..., T, H, D]`` (token axis third from last) moved from ``old_pos`` to ``new_pos`` ``[T]``.

    Math in float32 (float64 for float64 keys), rounded once to ``k.dtype``. On CUDA with
    Triton the rotation runs in ``transfer.kernels``' kernel over the same tables.
    """
    t, d = k.shape[-3], k.shape[-1]
    if d != spec.head_dim:
        raise BlendError(f"keys have head_dim {d} but the model's rope covers {spec.head_dim}")
    if old_pos.shape != (t,) or new_pos.shape != (t,):
        raise BlendError(f"positions must be [{t}], got {tuple(old_pos.shape)} and {tuple(new_pos.shape)}")
    pos_dev = k.device
    cos, sin = delta_tables(spec, old_pos.to(pos_dev), new_pos.to(pos_dev))
    if k.is_cuda and k.dtype != torch.float64:
        from kvtier.transfer.kernels.ops import triton_available

        if triton_available():
            from kvtier.transfer.kernels.rope_triton import rerotate_triton

            return rerotate_triton(k, cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous())
    work = torch.float64 if k.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(work)[:, None, :], sin.to(work)[:, None, :]  # [T, 1, D/2]: broadcast over heads
    kf = k.to(work)
    half = d // 2
    x1, x2 = kf[..., :half], kf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(k.dtype)


def rerotate_kv(kv: torch.Tensor, old_start: int, new_start: int, spec: RopeSpec) -> torch.Tensor:
    """A copy of ``kv`` ``[L, 2, T, H, D]`` whose keys moved from ``old_start..`` to ``new_start..``."""
    if old_start == new_start:
        return kv
    t = int(kv.shape[2])
    old = torch.arange(old_start, old_start + t, device=kv.device)
    new = torch.arange(new_start, new_start + t, device=kv.device)
    out = kv.clone()
    out[:, 0] = rerotate_keys(kv[:, 0], old, new, spec)
    return out
