"""Triton gather/scatter kernels between paged KV planes and a contiguous chunk buffer.

Imported only when a CUDA tensor is moved and Triton is importable (``kvtier.transfer.kernels.ops`` decides);
CPU machines and CI never import Triton.

One launch covers every (layer, plane) pair and every token: grid axis 1 is the
``layer * num_planes + plane`` row, axis 0 tiles the tokens. Each program moves a
``[BLOCK_T, BLOCK_HD]`` tile per step, where the ``HD`` axis is ``head * D + d``. Layer bases
are passed as int64 *element offsets* from one base tensor (``plane_off``), so all layers fit in
one launch without a pointer array of mixed provenance.

Data is moved as same-width integers (the caller views bf16 as int16, fp8 as uint8, ...), so the
copy is bit-exact whatever the float format, NaN payloads included.

Invariants (checked by the caller): ``s_d == 1``; slots are in range; for ``ALIGNED`` every row
start is a multiple of ``VEC`` elements (16 bytes), which lets the compiler emit 16-byte accesses.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_offsets(
    plane_off_ptr,
    slot_ptr,
    lp_base,
    n_t,
    s_blk,
    s_off,
    s_h,
    dst_lp_stride,
    block_size,
    HD: tl.constexpr,
    D: tl.constexpr,
    HD_CONTIG: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    j0: tl.constexpr,
):
    pid_t = tl.program_id(0)
    lp = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < n_t
    slot = tl.load(slot_ptr + t, mask=t_mask, other=0).to(tl.int64)
    base = tl.load(plane_off_ptr + lp_base + lp)
    row = base + (slot // block_size) * s_blk + (slot % block_size) * s_off
    dst_row = lp.to(tl.int64) * dst_lp_stride + t.to(tl.int64) * HD
    if ALIGNED:
        row = tl.multiple_of(row, VEC)
        dst_row = tl.multiple_of(dst_row, VEC)
    j = j0 + tl.arange(0, BLOCK_HD)
    if HD_CONTIG:
        inner = j
    else:
        inner = (j // D) * s_h + (j % D)
    mask = t_mask[:, None] & (j < HD)[None, :]
    src_off = row[:, None] + inner[None, :]
    dst_off = dst_row[:, None] + j[None, :]
    return src_off, dst_off, mask


@triton.jit
def gather_kernel(
    src_ptr,
    plane_off_ptr,
    lp_base,
    slot_ptr,
    n_t,
    dst_ptr,
    dst_lp_stride,
    s_blk,
    s_off,
    s_h,
    block_size,
    HD: tl.constexpr,
    D: tl.constexpr,
    HD_CONTIG: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """dst[lp, t, j] = plane(lp_base + lp)[slot[t], j]  (dst: [n_lp, n_t, HD])."""
    for j0 in tl.static_range(0, HD, BLOCK_HD):
        src_off, dst_off, mask = _tile_offsets(
            plane_off_ptr,
            slot_ptr,
            lp_base,
            n_t,
            s_blk,
            s_off,
            s_h,
            dst_lp_stride,
            block_size,
            HD,
            D,
            HD_CONTIG,
            ALIGNED,
            VEC,
            BLOCK_T,
            BLOCK_HD,
            j0,
        )
        x = tl.load(src_ptr + src_off, mask=mask)
        tl.store(dst_ptr + dst_off, x, mask=mask)


@triton.jit
def scatter_kernel(
    dst_ptr,
    plane_off_ptr,
    lp_base,
    slot_ptr,
    n_t,
    src_ptr,
    src_lp_stride,
    s_blk,
    s_off,
    s_h,
    block_size,
    HD: tl.constexpr,
    D: tl.constexpr,
    HD_CONTIG: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """plane(lp_base + lp)[slot[t], j] = src[lp, t, j]  (src: [n_lp, n_t, HD])."""
    for j0 in tl.static_range(0, HD, BLOCK_HD):
        paged_off, chunk_off, mask = _tile_offsets(
            plane_off_ptr,
            slot_ptr,
            lp_base,
            n_t,
            s_blk,
            s_off,
            s_h,
            src_lp_stride,
            block_size,
            HD,
            D,
            HD_CONTIG,
            ALIGNED,
            VEC,
            BLOCK_T,
            BLOCK_HD,
            j0,
        )
        x = tl.load(src_ptr + chunk_off, mask=mask)
        tl.store(dst_ptr + paged_off, x, mask=mask)


def tile_config(hd: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_HD, num_warps): about 16 KiB per tile step, whole rows when they fit.

    16 KiB per step over 4 warps is 8 x 16-byte accesses per thread in flight: enough to hide
    HBM latency; for zero-copy PCIe reads more programs (not bigger tiles) add the concurrency.
    """
    block_hd = min(triton.next_power_of_2(hd), max(16, 8192 // elem_bytes))
    block_t = max(1, min(64, (16384 // elem_bytes) // block_hd))
    return block_t, block_hd, 4
