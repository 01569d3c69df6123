"""Paged gather/scatter: validation, backend choice and the (layer-plane x token) launch unit.

``gather`` copies the KV of the tokens in ``slot_mapping`` out of a list of per-layer paged
tensors into a contiguous chunk buffer ``[L, 2, T, H, D]`` (MLA ``[L, 1, T, 1, latent]``); ``scatter``
writes such a buffer back into the slots. Host buffers go through ``kvtier.transfer.kernels.host``.

Backends: Triton on CUDA when Triton imports and ``d`` has unit stride; otherwise the torch
reference (``kvtier.transfer.kernels.reference``), which is also what CPU machines and CI run. Both compute
the same thing bit for bit: the data is moved, never converted.

Invariants and reasons:
* Slots must lie in ``[0, num_blocks * block_size)``; checking needs one device sync, so the
  layer-wise paths check once and pass ``check_slots=False`` per layer.
* Scatter with a repeated slot writes one of the tokens' rows, unspecified which (as with any
  parallel scatter); callers never map two tokens to one slot.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvtier.transfer.kernels import reference
from kvtier.transfer.layout import (
    KVLayout,
    LayerEntry,
    LayoutError,
    LayoutKind,
    LayoutTypeError,
    as_entries,
    detect_layout,
    validate_layers,
)

LayoutArg = KVLayout | LayoutKind | str | None
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (checked once; CPU-only installs simply lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Prepared:
    """A validated call: entries, layout, device, slots, and the backend that will run."""

    entries: list[LayerEntry]
    layout: KVLayout
    device: torch.device
    slots: torch.Tensor
    use_triton: bool
    launch_cache: dict[str, object] = field(default_factory=dict)
    """Per-call constants of the Triton launch (row table, base tensor), computed once: a staged
    or layer-wise transfer launches many times with the same caches."""

    @property
    def num_rows(self) -> int:
        """Number of (layer, plane) rows: ``L * P``."""
        return len(self.entries) * self.layout.num_planes

    @property
    def row_elems(self) -> int:
        """Elements of one token in one plane: ``H * D``."""
        return self.layout.num_kv_heads * self.layout.head_dim


def resolve_layout(entries: Sequence[LayerEntry], layout: LayoutArg) -> KVLayout:
    if isinstance(layout, KVLayout):
        return layout
    return detect_layout(entries[0], kind=layout)


def prepare(
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    layout: LayoutArg = None,
    *,
    check_slots: bool = True,
    backend: str = "auto",
) -> Prepared:
    """Validate the caches and slots; raise ``TypeError``/``ValueError`` naming the problem."""
    entries = as_entries(kv_caches)
    if not entries:
        raise LayoutError("kv_caches is empty: need one entry per layer")
    lay = resolve_layout(entries, layout)
    device = validate_layers(lay, entries)
    if not isinstance(slot_mapping, torch.Tensor):
        raise LayoutTypeError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dtype not in (torch.int64, torch.int32):
        raise LayoutTypeError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    if slot_mapping.dim() != 1:
        raise LayoutError(
            f"slot_mapping must be 1-D (one slot per token), got shape {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.device != device:
        raise LayoutError(f"slot_mapping is on {slot_mapping.device} but the KV cache is on {device}")
    slots = slot_mapping.to(torch.int64).contiguous()
    if check_slots and slots.numel():
        lo, hi = (int(x) for x in torch.aminmax(slots))
        if lo < 0 or hi >= lay.num_slots:
            raise LayoutError(
                f"slot_mapping out of range: values in [{lo}, {hi}], cache has {lay.num_slots} slots "
                f"({lay.num_blocks} blocks x {lay.block_size})"
            )
    if backend not in ("auto", "torch", "triton"):
        raise LayoutError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    can_triton = device.type == "cuda" and lay.inner_contiguous and triton_available()
    if backend == "triton" and not can_triton:
        raise LayoutError(
            f"triton backend unavailable for {lay.kind.value} on {device} (needs CUDA, triton, s_d == 1)"
        )
    return Prepared(entries, lay, device, slots, can_triton and backend != "torch")


def check_chunk(prep: Prepared, buf: torch.Tensor, num_tokens: int, what: str) -> None:
    """A chunk buffer must have the layout's chunk shape and dtype, and rows ``[T, H*D]`` contiguous.

    Rows may be spaced apart (a token-range slice of a longer chunk is accepted as is, so a
    retrieved prefix needs no copy), but each row's tokens must be packed.
    """
    want = prep.layout.chunk_shape(len(prep.entries), num_tokens)
    if not isinstance(buf, torch.Tensor):
        raise LayoutTypeError(f"{what} must be a torch.Tensor, got {type(buf).__name__}")
    if tuple(buf.shape) != want:
        raise LayoutError(
            f"{what} has shape {tuple(buf.shape)}, expected {want} for {prep.layout.kind.value}"
        )
    if buf.dtype != prep.layout.dtype:
        raise LayoutTypeError(f"{what} has dtype {buf.dtype}, the KV cache has {prep.layout.dtype}")
    try:
        rows_view(buf, prep)
    except (RuntimeError, LayoutError) as e:
        raise LayoutError(f"{what} must have packed [T, H, D] rows (strides {buf.stride()})") from e


def rows_view(buf: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """The chunk buffer seen as ``[L * P, T, H * D]`` with unit-stride rows (raises if impossible)."""
    n_t = prep.slots.numel()
    rows = buf.view(prep.num_rows, n_t, prep.row_elems)
    if (n_t > 1 and rows.stride(1) != prep.row_elems) or rows.stride(2) != 1:
        raise LayoutError("chunk rows are not packed [T, H*D]")
    return rows


@functools.lru_cache(maxsize=64)
def _plane_table(base: int, ptrs: tuple[int, ...], elem: int, device: torch.device) -> torch.Tensor:
    """int64 element offsets of each (layer, plane) row from ``base`` (layer 0's tensor), on ``device``.

    Cached by the pointers, so the per-layer calls of a layer-wise pass reuse one table and
    never block on a host-to-device copy.
    """
    return torch.tensor([(p - base) // elem for p in ptrs], dtype=torch.int64, device=device)


def _row_pointers(prep: Prepared) -> tuple[int, ...]:
    lay, elem = prep.layout, prep.layout.dtype.itemsize
    out = []
    for e in prep.entries:
        for p, base in enumerate(lay.plane_bases(e)):
            out.append(base.data_ptr() + lay.planes[p].offset * elem)
    return tuple(out)


def move_rows(
    prep: Prepared,
    row0: int,
    slots: torch.Tensor,
    chunk_rows: torch.Tensor,
    *,
    to_chunk: bool,
) -> None:
    """Copy rows ``row0 .. row0 + chunk_rows.shape[0]`` of tokens ``slots`` between cache and chunk.

    ``chunk_rows`` is ``[n_rows, n_t, H * D]`` with packed rows (any row stride), and may live in pinned host memory
    when the Triton backend runs (zero-copy: the kernel reads/writes it over PCIe).
    """
    n_rows, n_t = chunk_rows.shape[0], slots.numel()
    if n_rows == 0 or n_t == 0:
        return
    if not prep.use_triton:
        reference.move_rows(prep.layout, prep.entries, row0, slots, chunk_rows, to_chunk=to_chunk)
        return
    _triton_move(prep, row0, slots, chunk_rows, to_chunk=to_chunk)


def _triton_move(
    prep: Prepared, row0: int, slots: torch.Tensor, chunk_rows: torch.Tensor, *, to_chunk: bool
) -> None:
    from kvtier.transfer.kernels import triton_kernels as tk

    lay = prep.layout
    elem = lay.dtype.itemsize
    if "table" not in prep.launch_cache:
        ptrs = _row_pointers(prep)
        base = lay.plane_bases(prep.entries[0])[0]
        if any((p - base.data_ptr()) % elem for p in ptrs):
            raise LayoutError("KV planes are not element-aligned relative to each other")
        prep.launch_cache.update(
            table=_plane_table(base.data_ptr(), ptrs, elem, prep.device),
            src=base.view(_INT_VIEW[elem]),
            ptrs_aligned=all(p % 16 == 0 for p in ptrs),
        )
    table = prep.launch_cache["table"]
    src = prep.launch_cache["src"]
    ivt = _INT_VIEW[elem]
    a0 = lay.planes[0]
    vec = max(1, 16 // elem)
    hd, d = prep.row_elems, lay.head_dim
    hd_contig = lay.num_kv_heads == 1 or a0.s_h == d
    aligned = (
        bool(prep.launch_cache["ptrs_aligned"])
        and chunk_rows.data_ptr() % 16 == 0
        and all(s % vec == 0 for s in (a0.s_blk, a0.s_off, hd, chunk_rows.stride(0)))
        and (hd_contig or (a0.s_h % vec == 0 and d % vec == 0))
    )
    block_t, block_hd, warps = tk.tile_config(hd, elem)
    chunk = chunk_rows.view(ivt)
    n_t = slots.numel()
    grid = (triton_cdiv(n_t, block_t), chunk_rows.shape[0])
    kernel = tk.gather_kernel if to_chunk else tk.scatter_kernel
    with torch.cuda.device(prep.device):
        kernel[grid](
            src,
            table,
            row0,
            slots,
            n_t,
            chunk,
            chunk_rows.stride(0),
            a0.s_blk,
            a0.s_off,
            a0.s_h,
            lay.block_size,
            HD=hd,
            D=d,
            HD_CONTIG=hd_contig,
            ALIGNED=aligned,
            VEC=vec,
            BLOCK_T=block_t,
            BLOCK_HD=block_hd,
            num_warps=warps,
        )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
