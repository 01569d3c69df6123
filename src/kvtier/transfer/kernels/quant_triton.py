"""Triton kernels of ``quant_kernels``: paged flash-layout caches <-> packed codec chunks.

Imported only for CUDA tensors when Triton imports. Each kernel computes exactly what the torch
codec in ``serde.kvcodec`` computes (see its invariants): scale = extreme * ``RECIP`` (an fp32
constant, as torch multiplies), IEEE ``div_rn``, ``rint``, no fusable multiply-add, and the same packed layout: per chunk, codes ``[L, 2, T, H, D / per_byte]`` then
fp32 scales (int8/fp8: ``[L, 2, T, H]``; int4/int2: key scale and offset ``[L, T/64, H, D]``,
value scale and offset ``[L, T, H]``). Offsets into the output are int64 (32k tokens of an 8B
model's packed KV exceed 2**31 bytes).

NOTE: the scale reductions propagate NaN (``_max_nan``/``_min_nan``, ``PropagateNan.ALL``):
``tl.max``/``tl.min`` lower to maxnum/minnum, which drop NaN, so a NaN element gave a finite scale
and garbage codes that the engine's scale check (``store_packed_range``) could not see. Folding it
into the reduction the kernel does anyway costs nothing extra; for finite KV the bits are the same.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvtier.serde.kvcodec import KEY_GROUP_TOKENS, Fp8Codec, KiviCodec, KVCodec, _recip

BLOCK_T = 16
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter (used to debug these kernels without a GPU) has no ``div_rn``; its
``/`` is numpy's, which is IEEE division already."""


@triton.jit
def _div(a, b, INTERP: tl.constexpr):
    if INTERP:
        return a / b
    else:
        return libdevice.div_rn(a, b)


@triton.jit
def _rint(x, INTERP: tl.constexpr):
    """Round half to even. The interpreter path adds and subtracts 1.5 * 2**23 (exact RNE for
    |x| < 2**22 in numpy); compiled code must not, since LLVM may fuse ``x * inv + M`` into an FMA."""
    if INTERP:
        return (x + 12582912.0) - 12582912.0
    else:
        return libdevice.rint(x)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e4m3_bits(y, INTERP: tl.constexpr):
    """float8_e4m3fn bits of fp32 ``y`` (|y| <= 448), rounded to nearest even exactly as torch's
    cast does. Done in integer arithmetic because Triton's own fp32 -> fp8 cast may round twice
    (through fp16), which differs from torch in ~1 % of elements (measured on the H200)."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31).to(tl.uint32)
    ab = bits & 0x7FFFFFFF
    a = ab.to(tl.float32, bitcast=True)
    # normal: round the fp32 mantissa to 3 bits (carry lands in the exponent), rebias 127 -> 7
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - 960
    # subnormal (a < 2**-6): k * 2**-9, k = round(a * 512) in 0..8 (8 is the smallest normal)
    sub = _rint(a * 512.0, INTERP).to(tl.uint32)
    code = tl.where(a < 0.015625, sub, normal)
    return ((sign << 7) | code).to(tl.uint8)


@triton.jit
def _src_ptrs(src, slot_ptr, t, mask_t, p, h, s_p, s_blk, s_off, s_h, bs, D: tl.constexpr):
    slot = tl.load(slot_ptr + t, mask=mask_t, other=0)
    blk = slot // bs
    off = slot % bs
    d = tl.arange(0, D)
    return src + p * s_p + blk[:, None] * s_blk + off[:, None] * s_off + h * s_h + d[None, :]


@triton.jit
def _per_token_kernel(
    src,
    slot_ptr,
    codes,
    words,
    n_t,
    s_p,
    s_blk,
    s_off,
    s_h,
    bs,
    layer,
    CT,
    H,
    packed,
    codes_bytes,
    QMAX: tl.constexpr,
    RECIP: tl.constexpr,
    FP8: tl.constexpr,
    INTERP: tl.constexpr,
    TO_CHUNK: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    mask_t = t < n_t
    mask = mask_t[:, None]
    ptrs = _src_ptrs(src, slot_ptr, t, mask_t, p, h, s_p, s_blk, s_off, s_h, bs, D)
    t64 = t.to(tl.int64)
    chunk = t64 // CT
    row = (layer * 2 + p) * CT + t64 % CT
    d = tl.arange(0, D)
    code_off = chunk[:, None] * packed + (row[:, None] * H + h) * D + d[None, :]
    word_off = (chunk * packed + codes_bytes) // 4 + row * H + h
    if TO_CHUNK:
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        s = tl.reduce(tl.abs(x), 1, _max_nan) * RECIP
        s = tl.where(s == 0, 1.0, s)
        inv = _div(tl.full(s.shape, 1.0, tl.float32), s, INTERP)
        y = x * inv[:, None]
        if FP8:
            q = _e4m3_bits(tl.minimum(tl.maximum(y, -448.0), 448.0), INTERP)
        else:
            q = tl.minimum(tl.maximum(_rint(y, INTERP), -127.0), 127.0).to(tl.int8)
        tl.store(codes + code_off, q, mask=mask)
        tl.store(words + word_off, s, mask=mask_t)
    else:
        q = tl.load(codes + code_off, mask=mask).to(tl.float32)  # int8 / fp8 -> fp32 is exact
        s = tl.load(words + word_off, mask=mask_t, other=1.0)
        x = q * s[:, None]
        tl.store(ptrs, x.to(src.dtype.element_ty), mask=mask)


@triton.jit
def _kivi_kernel(
    src,
    slot_ptr,
    codes,
    words,
    n_t,
    s_p,
    s_blk,
    s_off,
    s_h,
    bs,
    layer,
    CT,
    H,
    packed,
    n_codes,
    nk,
    nv,
    KEYS: tl.constexpr,
    BITS: tl.constexpr,
    QMAX: tl.constexpr,
    RECIP: tl.constexpr,
    TO_CHUNK: tl.constexpr,
    INTERP: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
):
    """Keys (``KEYS``): one program per 64-token group & head, scales per channel. Values: one
    program per ``BT`` tokens & head, scales per token. ``BT`` divides the chunk either way."""
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    if KEYS:
        p = 0
    else:
        p = 1
    t = pid_t * BT + tl.arange(0, BT)
    mask_t = t < n_t
    ptrs = _src_ptrs(src, slot_ptr, t, mask_t, p, h, s_p, s_blk, s_off, s_h, bs, D)
    t64 = t.to(tl.int64)
    chunk = t64 // CT
    tt = t64 % CT
    row = (layer * 2 + p) * CT + tt
    j = tl.arange(0, DB)
    code_off = chunk[:, None] * packed + (row[:, None] * H + h) * DB + j[None, :]
    base_w = (chunk * packed + n_codes) // 4  # [BT]; constant over a key group
    shifts = (tl.arange(0, PB) * BITS).to(tl.uint8)
    d = tl.arange(0, D)
    if KEYS:
        g = (layer * (CT // 64) + tt // 64) * H + h  # [BT], equal within the group
        s_off_w = base_w[:, None] + g[:, None] * D + d[None, :]  # [BT, D]
        o_off_w = s_off_w + nk
    else:
        s_off_w = base_w + 2 * nk + (layer * CT + tt) * H + h  # [BT]
        o_off_w = s_off_w + nv
    if TO_CHUNK:
        x = tl.load(ptrs, mask=mask_t[:, None], other=0.0).to(tl.float32)
        if KEYS:
            mn = tl.reduce(x, 0, _min_nan)[None, :]
            mx = tl.reduce(x, 0, _max_nan)[None, :]
        else:
            mn = tl.reduce(x, 1, _min_nan)[:, None]
            mx = tl.reduce(x, 1, _max_nan)[:, None]
        s = (mx - mn) * RECIP
        s = tl.where(s == 0, 1.0, s)
        inv = _div(tl.full(s.shape, 1.0, tl.float32), s, INTERP)
        off = _div(mn, s, INTERP)
        q = tl.minimum(tl.maximum(_rint((x - mn) * inv, INTERP), 0.0), QMAX).to(tl.uint8)
        q3 = tl.reshape(q, (BT, DB, PB))
        b = tl.sum(q3 << shifts[None, None, :], axis=2).to(tl.uint8)
        tl.store(codes + code_off, b, mask=mask_t[:, None])
        if KEYS:
            first = (tt % 64 == 0)[:, None] & mask_t[:, None]
            tl.store(words + s_off_w, tl.broadcast_to(s, (BT, D)), mask=first)
            tl.store(words + o_off_w, tl.broadcast_to(off, (BT, D)), mask=first)
        else:
            tl.store(words + s_off_w, tl.reshape(s, (BT,)), mask=mask_t)
            tl.store(words + o_off_w, tl.reshape(off, (BT,)), mask=mask_t)
    else:
        b = tl.load(codes + code_off, mask=mask_t[:, None], other=0)
        q = ((b[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        q = tl.reshape(q, (BT, D))
        if KEYS:
            s = tl.load(words + s_off_w, mask=mask_t[:, None], other=1.0)
            off = tl.load(words + o_off_w, mask=mask_t[:, None], other=0.0)
        else:
            s = tl.load(words + s_off_w, mask=mask_t, other=1.0)[:, None]
            off = tl.load(words + o_off_w, mask=mask_t, other=0.0)[:, None]
        x = (q + off) * s
        tl.store(ptrs, x.to(src.dtype.element_ty), mask=mask_t[:, None])


def _run(
    caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    codec: KVCodec,
    ct: int,
    out: torch.Tensor,
    to_chunk: bool,
    first_layer: int = 0,
    num_layers: int | None = None,
) -> None:
    """``caches`` are layers ``first_layer ..`` of chunks of ``num_layers`` (default: all given)."""
    c0 = caches[0]
    _, _, bs, heads, dim = c0.shape
    if c0.stride(4) != 1:
        raise ValueError("the fused path needs head_dim with unit stride")
    if not out.is_contiguous():
        raise ValueError("the packed chunks must be one contiguous [chunks, bytes] tensor")
    n_t = slots.numel()
    n_layers = len(caches) if num_layers is None else num_layers
    shape = (n_layers, 2, ct, heads, dim)
    packed = codec.packed_nbytes(shape)
    flat = out.view(-1)
    words = flat.view(torch.float32)
    for layer, c in enumerate(caches, start=first_layer):
        st = (c.stride(0), c.stride(1), c.stride(2), c.stride(3))
        if isinstance(codec, KiviCodec):
            n_codes = n_layers * 2 * ct * heads * dim // codec.per_byte
            nk, nv = n_layers * (ct // KEY_GROUP_TOKENS) * heads * dim, n_layers * ct * heads
            common = dict(
                BITS=codec.bits,
                QMAX=codec.qmax,
                RECIP=_recip(codec.qmax),
                TO_CHUNK=to_chunk,
                INTERP=INTERPRET,
                D=dim,
            )
            args = (c, slots, flat, words, n_t, *st, bs, layer, ct, heads, packed, n_codes, nk, nv)
            _kivi_kernel[(n_t // KEY_GROUP_TOKENS, heads)](*args, KEYS=True, BT=KEY_GROUP_TOKENS, **common)
            _kivi_kernel[(triton.cdiv(n_t, BLOCK_T), heads)](*args, KEYS=False, BT=BLOCK_T, **common)
        else:
            fp8 = isinstance(codec, Fp8Codec)
            # fp8 codes are written as their bits (``_e4m3_bits``) and read back as fp8
            codes = flat.view(
                torch.float8_e4m3fn if fp8 and not to_chunk else torch.uint8 if fp8 else torch.int8
            )
            codes_bytes = n_layers * 2 * ct * heads * dim
            _per_token_kernel[(triton.cdiv(n_t, BLOCK_T), heads, 2)](
                c,
                slots,
                codes,
                words,
                n_t,
                *st,
                bs,
                layer,
                ct,
                heads,
                packed,
                codes_bytes,
                QMAX=448.0 if fp8 else 127.0,
                RECIP=_recip(448.0 if fp8 else 127.0),
                FP8=fp8,
                INTERP=INTERPRET,
                TO_CHUNK=to_chunk,
                D=dim,
                BT=BLOCK_T,
            )


def gather_quant(
    caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    codec: KVCodec,
    ct: int,
    out: torch.Tensor,
    first_layer: int = 0,
    num_layers: int | None = None,
) -> None:
    _run(caches, slots, codec, ct, out, True, first_layer, num_layers)


def scatter_dequant(
    packed: torch.Tensor,
    caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    codec: KVCodec,
    ct: int,
    first_layer: int = 0,
    num_layers: int | None = None,
) -> None:
    _run(caches, slots, codec, ct, packed, False, first_layer, num_layers)
