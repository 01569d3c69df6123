"""Triton kernels of ``quant_kernels``: paged flash-layout caches <-> packed codec chunks.

Imported only for CUDA tensors when Triton imports. Each kernel computes exactly what the torch
codec in ``serde.kvcodec`` computes (see its invariants): scale = extreme * ``RECIP`` (an fp32
constant, as torch multiplies), IEEE ``div_rn``, ``rint``, no fusable multiply-add, and the same packed layout: per chunk, codes ``[L, 2, T, H, D / per_byte]`` then
fp32 scales (int8/fp8: ``[L, 2, T, H]``; int4/int2: key scale and offset ``[L, T/64, H, D]``,
value scale and offset ``[L, T, H]``). Offsets into the output are int64 (32k tokens of an 8B
model's packed KV exceed 2**31 bytes).

One launch covers every layer of a call: grid axis 2 is ``layer * 2 + plane`` and a program finds
its layer at ``caches[0]`` plus an offset read from ``layer_table``'s device table. Layers whose
strides differ (not seen from vLLM; possible from a caller) get one launch each instead.

NOTE: the scale reductions propagate NaN (``_max_nan``/``_min_nan``, ``PropagateNan.ALL``):
``tl.max``/``tl.min`` lower to maxnum/minnum, which drop NaN, so a NaN element gave a finite scale
and garbage codes that the engine's scale check (``store_packed_range``) could not see. Folding it
into the reduction the kernel does anyway costs nothing extra; for finite KV the bits are the same.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvtier.serde.kvcodec import KEY_GROUP_TOKENS, Fp8Codec, KiviCodec, KVCodec, _recip

BLOCK_T = 16
KIVI_VALUE_TOKENS = 64
"""Tokens per step of an int4/int2 value program (64, 32 or 16: a loop over the program's 64
tokens). 64 is what was measured (H200, 2026-12-02: the gather kernel alone at 589 GB/s, against
805 GB/s when values had their own launch of 16-token programs); 16 is the candidate to recover
that, bit-exact in the interpreter but not yet measured on a GPU (``benchmarks/gpu_next/int4.sh``).
Bytes do not depend on it: a value's scale is per token."""
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
def _layer_base(src, layer_off, li, ALIGN: tl.constexpr):
    """Layer ``li``'s cache: ``src`` (layer 0's) plus its offset from the table, in units of
    ``ALIGN`` elements, so the compiler still knows the base is 16-byte aligned (vector loads)."""
    return src + tl.load(layer_off + li) * ALIGN


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
    layer_off,
    slot_ptr,
    codes,
    words,
    n_t,
    s_p,
    s_blk,
    s_off,
    s_h,
    bs,
    first_layer,
    CT,
    H,
    packed,
    codes_bytes,
    ALIGN: tl.constexpr,
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
    p = tl.program_id(2) % 2
    li = tl.program_id(2) // 2
    layer = first_layer + li
    src = _layer_base(src, layer_off, li, ALIGN)
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
def _kivi_part(
    src,
    slot_ptr,
    codes,
    words,
    pid_t,
    h,
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
    """One plane of ``BT`` tokens & one head. Keys (``KEYS``, ``BT`` = 64: one key group): scales
    per channel. Values: scales per token (the block size does not change a value's bytes)."""
    PB: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PB
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


@triton.jit
def _kivi_kernel(
    src,
    layer_off,
    slot_ptr,
    codes,
    words,
    n_t,
    s_p,
    s_blk,
    s_off,
    s_h,
    bs,
    first_layer,
    CT,
    H,
    packed,
    n_codes,
    nk,
    nv,
    ALIGN: tl.constexpr,
    BITS: tl.constexpr,
    QMAX: tl.constexpr,
    RECIP: tl.constexpr,
    TO_CHUNK: tl.constexpr,
    INTERP: tl.constexpr,
    D: tl.constexpr,
    VBT: tl.constexpr,
):
    """Grid ``(tokens / 64, heads, 2 * layers)``: axis 2 is layer * 2 + plane, so one launch moves
    every layer's keys (one 64-token group a program) and values (the same 64 tokens)."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    li = tl.program_id(2) // 2
    layer = first_layer + li
    src = _layer_base(src, layer_off, li, ALIGN)
    if tl.program_id(2) % 2 == 0:
        _kivi_part(
            src, slot_ptr, codes, words, pid_t, h, n_t, s_p, s_blk, s_off, s_h, bs, layer, CT, H,
            packed, n_codes, nk, nv, True, BITS, QMAX, RECIP, TO_CHUNK, INTERP, D, 64,
        )  # fmt: skip
    else:
        for i in tl.static_range(64 // VBT):  # the same 64 tokens' values, VBT at a time
            _kivi_part(
                src, slot_ptr, codes, words, pid_t * (64 // VBT) + i, h, n_t, s_p, s_blk, s_off, s_h, bs,
                layer, CT, H, packed, n_codes, nk, nv, False, BITS, QMAX, RECIP, TO_CHUNK, INTERP, D, VBT,
            )  # fmt: skip


@dataclass
class _Table:
    """A device copy of one layer-offset table and what makes it safe to share between streams:
    the event after its H2D copy (a kernel on another stream waits for it once) and the streams
    it was used on (recorded, so the caching allocator never reuses it under their kernels)."""

    offs: torch.Tensor
    ready: torch.cuda.Event | None
    streams: set[int] = field(default_factory=set)


_TABLES: OrderedDict[tuple[object, ...], _Table] = OrderedDict()
_TABLES_MAX = 16
_TABLES_LOCK = threading.Lock()


def layer_table(caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int] | None:
    """The kernels' per-layer base addresses as an int64 tensor on the caches' device: layer i's
    offset from ``caches[0]`` in units of ``align`` elements, and ``align`` (16 bytes' worth of
    elements where every offset allows it, else 1). ``None`` where the layers' strides differ
    (then the caller launches per layer).

    Why offsets and not raw pointers: the kernel adds them to layer 0's pointer argument, so it
    needs no integer-to-pointer cast (which Triton's CPU interpreter cannot follow), and the
    ``* align`` keeps the base's 16-byte alignment visible to the compiler (vectorized loads).
    The table depends only on the offsets, so it is cached by them: the vLLM worker's per-layer
    calls (one layer, offset 0) and a transfer's group-by-group calls build it once."""
    c0 = caches[0]
    if any(c.stride() != c0.stride() for c in caches):
        return None
    es = c0.element_size()
    diffs = [c.data_ptr() - c0.data_ptr() for c in caches]
    if any(d % es for d in diffs):
        return None
    align = 16 // es if es <= 16 and all(d % 16 == 0 for d in diffs) else 1
    units = tuple(d // (es * align) for d in diffs)
    dev = c0.device
    key = (dev.type, dev.index, align, units)
    with _TABLES_LOCK:
        entry = _TABLES.get(key)
        if entry is None:
            entry = _new_table(units, dev)
            _TABLES[key] = entry
            if len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
        else:
            _TABLES.move_to_end(key)
        if entry.ready is not None:
            cur = torch.cuda.current_stream(dev)
            if cur.stream_id not in entry.streams:
                cur.wait_event(entry.ready)
                entry.offs.record_stream(cur)
                entry.streams.add(cur.stream_id)
    return entry.offs, align


def _new_table(units: tuple[int, ...], dev: torch.device) -> _Table:
    host = torch.tensor(units, dtype=torch.int64)
    if dev.type != "cuda":
        return _Table(host, None)
    cur = torch.cuda.current_stream(dev)
    offs = host.pin_memory().to(dev, non_blocking=True)  # no host sync; the pinned block is event-guarded
    ready = torch.cuda.Event()
    ready.record(cur)
    return _Table(offs, ready, {cur.stream_id})


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
    """``caches`` are layers ``first_layer ..`` of chunks of ``num_layers`` (default: all given).
    One launch for all of them where they share strides (``layer_table``), else one per layer."""
    if any(c.stride(4) != 1 for c in caches):
        raise ValueError("the fused path needs head_dim with unit stride")
    if not out.is_contiguous():
        raise ValueError("the packed chunks must be one contiguous [chunks, bytes] tensor")
    n_layers = len(caches) if num_layers is None else num_layers
    table = layer_table(caches)
    if table is not None:
        _launch(caches, table, slots, codec, ct, out, to_chunk, first_layer, n_layers)
        return
    for i, c in enumerate(caches):  # strides differ between layers: one launch each
        one = layer_table([c])
        assert one is not None  # one layer: always a table
        _launch([c], one, slots, codec, ct, out, to_chunk, first_layer + i, n_layers)


def _launch(
    caches: Sequence[torch.Tensor],
    table: tuple[torch.Tensor, int],
    slots: torch.Tensor,
    codec: KVCodec,
    ct: int,
    out: torch.Tensor,
    to_chunk: bool,
    first_layer: int,
    n_layers: int,
) -> None:
    c0 = caches[0]
    offs, align = table
    _, _, bs, heads, dim = c0.shape
    n_t = slots.numel()
    shape = (n_layers, 2, ct, heads, dim)
    packed = codec.packed_nbytes(shape)
    flat = out.view(-1)
    words = flat.view(torch.float32)
    st = (c0.stride(0), c0.stride(1), c0.stride(2), c0.stride(3))
    planes = 2 * len(caches)
    if isinstance(codec, KiviCodec):
        n_codes = n_layers * 2 * ct * heads * dim // codec.per_byte
        nk, nv = n_layers * (ct // KEY_GROUP_TOKENS) * heads * dim, n_layers * ct * heads
        _kivi_kernel[(n_t // KEY_GROUP_TOKENS, heads, planes)](
            c0, offs, slots, flat, words, n_t, *st, bs, first_layer, ct, heads, packed, n_codes, nk, nv,
            ALIGN=align,
            BITS=codec.bits,
            QMAX=codec.qmax,
            RECIP=_recip(codec.qmax),
            TO_CHUNK=to_chunk,
            INTERP=INTERPRET,
            D=dim,
            VBT=KIVI_VALUE_TOKENS,
        )  # fmt: skip
        return
    fp8 = isinstance(codec, Fp8Codec)
    # fp8 codes are written as their bits (``_e4m3_bits``) and read back as fp8
    codes = flat.view(torch.float8_e4m3fn if fp8 and not to_chunk else torch.uint8 if fp8 else torch.int8)
    codes_bytes = n_layers * 2 * ct * heads * dim
    _per_token_kernel[(triton.cdiv(n_t, BLOCK_T), heads, planes)](
        c0, offs, slots, codes, words, n_t, *st, bs, first_layer, ct, heads, packed, codes_bytes,
        ALIGN=align,
        QMAX=448.0 if fp8 else 127.0,
        RECIP=_recip(448.0 if fp8 else 127.0),
        FP8=fp8,
        INTERP=INTERPRET,
        TO_CHUNK=to_chunk,
        D=dim,
        BT=BLOCK_T,
    )  # fmt: skip


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
