"""RoPE re-rotation of cached keys: move K computed at ``old_pos`` to ``new_pos``.

Cached keys are stored after RoPE. Reusing them at another position (non-prefix reuse, e.g.
CacheBlend) needs ``R(new) k_raw``; since rotations compose, ``R(new) = R(new - old) R(old)``,
so one rotation by the delta suffices and the raw key is never needed.

Convention: Llama / HF ``rotate_half``: for pair ``i`` of ``(x[i], x[i + D/2])`` and angle
``a = delta * theta ** (-2i / D)``: ``x1' = x1 cos a - x2 sin a``, ``x2' = x2 cos a + x1 sin a``.
Angles in float64 (torch) or float32 (Triton); the rotation in float32, rounded once to k's dtype.

Layout: ``k`` is ``[..., T, H, D]`` (token axis third from last); positions are ``[T]`` ints.
"""

from __future__ import annotations

import torch

from kvtier.transfer.layout import LayoutError, LayoutTypeError


def inv_freq(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``theta ** (-2i / D)`` for ``i < D/2``, float32 (computed in float64 then rounded once)."""
    if head_dim % 2:
        raise LayoutError(f"RoPE needs an even head_dim, got {head_dim}")
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
    return (1.0 / (theta ** (i / head_dim))).to(torch.float32)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [..., T, H, D]`` to absolute positions ``pos [T]`` (from scratch), in float32 math."""
    f = inv_freq(x.shape[-1], theta, x.device)
    ang = pos.to(torch.float64)[:, None] * f.to(torch.float64)[None, :]  # [T, D/2]; exact positions
    return _rotate(x, ang.cos()[:, None, :], ang.sin()[:, None, :])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Math in float32 (float64 for float64 input), rounded once to ``x.dtype``."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, cos, sin = x.to(work), cos.to(work), sin.to(work)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _check(k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or k.dim() < 3:
        raise LayoutError(f"k must be [..., T, H, D], got {getattr(k, 'shape', type(k).__name__)}")
    if not k.dtype.is_floating_point or k.dtype.itemsize < 2:
        raise LayoutTypeError(f"k must be fp16/bf16/fp32, got {k.dtype}")
    if k.shape[-1] % 2:
        raise LayoutError(f"RoPE needs an even head_dim, got {k.shape[-1]}")
    t = k.shape[-3]
    for name, p in (("old_pos", old_pos), ("new_pos", new_pos)):
        if p.dtype not in (torch.int32, torch.int64):
            raise LayoutTypeError(f"{name} must be int32/int64, got {p.dtype}")
        if p.shape != (t,):
            raise LayoutError(f"{name} has shape {tuple(p.shape)}, expected ({t},)")
        if p.device != k.device:
            raise LayoutError(f"{name} is on {p.device}, k on {k.device}")


def rerotate_reference(
    k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, theta: float = 10000.0
) -> torch.Tensor:
    """Torch reference of ``rerotate``: rotate by ``new_pos - old_pos``.

    The angle and its sin/cos are taken in float64 (a float32 angle of a delta in the thousands
    is off by ~1e-4 rad), then the rotation runs in float32.
    """
    _check(k, old_pos, new_pos)
    cos, sin = delta_tables(k.shape[-1], old_pos, new_pos, theta)
    return _rotate(k, cos[:, None, :], sin[:, None, :])


def delta_tables(
    head_dim: int, old_pos: torch.Tensor, new_pos: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos``/``sin`` ``[T, D/2]`` of the delta angles, computed in float64."""
    delta = (new_pos.to(torch.int64) - old_pos.to(torch.int64)).to(torch.float64)
    ang = delta[:, None] * inv_freq(head_dim, theta, new_pos.device).to(torch.float64)[None, :]
    return ang.cos().to(torch.float32).contiguous(), ang.sin().to(torch.float32).contiguous()


def rerotate(
    k: torch.Tensor,
    old_pos: torch.Tensor,
    new_pos: torch.Tensor,
    theta: float = 10000.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Return ``k`` re-rotated from ``old_pos`` to ``new_pos`` (new tensor, same dtype/shape).

    Triton on CUDA when available (``backend="auto"``), else the torch reference; both use the
    same cos/sin tables and float32 math, so they agree to float32 rounding (FMA contraction).
    """
    _check(k, old_pos, new_pos)
    from kvtier.transfer.kernels.ops import triton_available

    if backend == "torch" or k.device.type != "cuda" or not triton_available():
        if backend == "triton":
            raise LayoutError("triton backend needs a CUDA tensor and triton")
        return rerotate_reference(k, old_pos, new_pos, theta)
    from kvtier.transfer.kernels.rope_triton import rerotate_triton

    return rerotate_triton(k, *delta_tables(k.shape[-1], old_pos, new_pos, theta))
