"""Triton kernel for ``kvtier.transfer.rope.rerotate`` (imported only on CUDA with Triton present).

One program handles ``BLOCK_T`` tokens of one leading index (batch/layer) for all heads. The
cos/sin tables ``[T, D/2]`` come from torch in float64 (rounded to float32), the same values the
reference uses: a float32 angle of a delta in the thousands would be off by ~1e-4 rad.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rerotate_kernel(
    k_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    T,
    H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid_t = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    t_mask = t < T
    mask = t_mask[:, None] & (i < HALF)[None, :]
    cs_off = t[:, None] * HALF + i[None, :]
    c = tl.load(cos_ptr + cs_off, mask=mask, other=0.0)
    s = tl.load(sin_ptr + cs_off, mask=mask, other=0.0)
    row = (m * T + t.to(tl.int64)) * (H * 2 * HALF)
    for h in tl.static_range(H):
        off = row[:, None] + h * 2 * HALF + i[None, :]
        x1 = tl.load(k_ptr + off, mask=mask).to(tl.float32)
        x2 = tl.load(k_ptr + off + HALF, mask=mask).to(tl.float32)
        tl.store(out_ptr + off, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + off + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def rerotate_triton(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``k [..., T, H, D]`` rotated by the angles of ``cos``/``sin`` ``[T, D/2]`` (float32, contiguous)."""
    t, h, d = k.shape[-3:]
    kc = k.contiguous()
    out = torch.empty_like(kc)
    m = kc.numel() // max(1, t * h * d)
    if kc.numel() == 0:
        return out
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_t = max(1, min(64, 4096 // block_half))
    grid = (triton.cdiv(t, block_t), m)
    with torch.cuda.device(k.device):
        _rerotate_kernel[grid](kc, out, cos, sin, t, H=h, HALF=half, BLOCK_T=block_t, BLOCK_HALF=block_half)
    return out
