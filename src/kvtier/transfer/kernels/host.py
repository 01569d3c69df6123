"""Public gather/scatter entry points, including the GPU <-> host paths.

For a CUDA cache and a host chunk buffer there are two ways across PCIe:

* ``zero_copy``: the kernel itself reads/writes the pinned host buffer (mapped into the GPU's
  address space). No staging memory, one launch; uses SMs for the whole transfer.
* ``staging``: the chunk is cut into pieces of ``staging_bytes``; each piece is gathered into a
  device ring slot and copied by the copy engine (``cudaMemcpyAsync``) on a side stream, so the
  kernel of piece i+1 overlaps the DMA of piece i. Leaves SMs free for the model.

Pieces are contiguous ranges of the ``[L * P, T, H * D]`` chunk (a row range of whole rows, or a
token range inside one row), so every DMA is one flat memcpy.

Stream contract: work is enqueued on the current stream (and a side stream it joins before
returning); nothing here synchronises the host except the slot range check. A caller that reads
the host buffer on the CPU must synchronise first (``torch.cuda.current_stream().synchronize()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from kvtier.devcopy import side_stream
from kvtier.transfer.kernels.ops import LayoutArg, Prepared, check_chunk, move_rows, prepare, rows_view
from kvtier.transfer.layout import LayerEntry, LayoutError

MODES = ("auto", "zero_copy", "staging")
DEFAULT_STAGING_BYTES = 16 << 20
_RING = 3
__all__ = ["MODES", "gather", "pieces", "scatter", "side_stream"]


def gather(
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    *,
    layout: LayoutArg = None,
    out: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    mode: str = "auto",
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    check_slots: bool = True,
    backend: str = "auto",
    join: bool = True,
) -> torch.Tensor:
    """Copy the KV of ``slot_mapping``'s tokens into a chunk buffer ``[L, 2, T, H, D]`` (MLA ``[L, 1, T, 1, lat]``).

    ``out`` (contiguous, right shape and dtype) or ``device`` (default: the cache's; ``"cpu"``
    for a CUDA cache allocates pinned host memory) picks the destination.

    ``join=False`` (host ``out`` through the staging ring): the current stream does not wait
    for the last DMAs, so a layer-wise caller's next gather (and the model's next layer) runs
    while this call's copies drain; the caller synchronises ``side_stream`` before reading
    ``out``. One join per layer left the copy engine idle at every layer boundary.
    """
    prep = prepare(kv_caches, slot_mapping, layout, check_slots=check_slots, backend=backend)
    n_t = prep.slots.numel()
    if out is None:
        dev = torch.device(device) if device is not None else prep.device
        pin = dev.type == "cpu" and prep.device.type == "cuda"
        out = torch.empty(
            prep.layout.chunk_shape(len(prep.entries), n_t),
            dtype=prep.layout.dtype,
            device=dev,
            pin_memory=pin,
        )
    check_chunk(prep, out, n_t, "out")
    _move(prep, rows_view(out, prep), to_chunk=True, mode=mode, staging_bytes=staging_bytes, join=join)
    return out


def scatter(
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    src: torch.Tensor,
    *,
    layout: LayoutArg = None,
    mode: str = "auto",
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    check_slots: bool = True,
    backend: str = "auto",
) -> None:
    """Write chunk buffer ``src`` (``[L, 2, T, H, D]``, any device) into the cache at ``slot_mapping``."""
    prep = prepare(kv_caches, slot_mapping, layout, check_slots=check_slots, backend=backend)
    check_chunk(prep, src, prep.slots.numel(), "src")
    _move(prep, rows_view(src, prep), to_chunk=False, mode=mode, staging_bytes=staging_bytes)


def _move(
    prep: Prepared, rows: torch.Tensor, *, to_chunk: bool, mode: str, staging_bytes: int, join: bool = True
) -> None:
    if mode not in MODES:
        raise LayoutError(f"mode must be one of {MODES}, got {mode!r}")
    if rows.numel() == 0:
        return
    if rows.device == prep.device:
        move_rows(prep, 0, prep.slots, rows, to_chunk=to_chunk)
        return
    if prep.device.type != "cuda" or rows.device.type != "cpu":
        raise LayoutError(f"cannot move KV between a cache on {prep.device} and a chunk on {rows.device}")
    pinned = rows.is_pinned()
    if mode == "zero_copy" and not (pinned and prep.use_triton):
        raise LayoutError("zero_copy needs a pinned host buffer and the Triton backend")
    if mode == "zero_copy":
        move_rows(prep, 0, prep.slots, rows, to_chunk=to_chunk)
    else:
        _staged(prep, rows, to_chunk=to_chunk, piece_bytes=staging_bytes, join=join)


def pieces(
    n_rows: int, n_t: int, row_elems: int, elem: int, piece_bytes: int, rows_packed: bool = True
) -> Iterator[tuple[int, int, int, int]]:
    """Cut ``[n_rows, n_t]`` into contiguous pieces ``(row0, n_rows, t0, n_t)`` of about ``piece_bytes``.

    Several whole rows form one piece only when rows are packed back to back (``rows_packed``).
    """
    tok_bytes = max(1, row_elems * elem)
    if n_t * tok_bytes >= piece_bytes or not rows_packed:
        step = max(1, piece_bytes // tok_bytes)
        for r in range(n_rows):
            for t0 in range(0, n_t, step):
                yield r, 1, t0, min(step, n_t - t0)
    else:
        step = max(1, piece_bytes // (n_t * tok_bytes))
        for r0 in range(0, n_rows, step):
            yield r0, min(step, n_rows - r0), 0, n_t


def _staged(
    prep: Prepared, rows: torch.Tensor, *, to_chunk: bool, piece_bytes: int, join: bool = True
) -> None:
    """Pipeline kernel (current stream) and DMA (side stream) through a ring of device buffers.

    ``join=False`` is for gathers only (a scatter's last kernel runs on the current stream anyway)."""
    n_rows, n_t, hd = rows.shape
    elem = rows.element_size()
    packed = rows.stride(0) == n_t * hd
    main = torch.cuda.current_stream(prep.device)
    side = side_stream(prep.device)
    cap = max(piece_bytes // elem, hd)
    ring = [torch.empty(cap, dtype=rows.dtype, device=prep.device) for _ in range(_RING)]
    free = [torch.cuda.Event() for _ in range(_RING)]  # slot may be overwritten
    ready = [torch.cuda.Event() for _ in range(_RING)]  # slot holds the piece
    start = torch.cuda.Event()
    start.record(main)
    side.wait_event(start)
    for i, (r0, nr, t0, nt) in enumerate(pieces(n_rows, n_t, hd, elem, piece_bytes, packed)):
        s = i % _RING
        host = rows[r0 : r0 + nr, t0 : t0 + nt]
        dev = ring[s][: nr * nt * hd].view(nr, nt, hd)
        slots = prep.slots[t0 : t0 + nt]
        if to_chunk:
            if i >= _RING:
                main.wait_event(free[s])
            move_rows(prep, r0, slots, dev, to_chunk=True)
            ready[s].record(main)
            side.wait_event(ready[s])
            with torch.cuda.stream(side):
                host.copy_(dev, non_blocking=True)
            free[s].record(side)
        else:
            if i >= _RING:
                side.wait_event(free[s])
            with torch.cuda.stream(side):
                dev.copy_(host, non_blocking=True)
            ready[s].record(side)
            main.wait_event(ready[s])
            move_rows(prep, r0, slots, dev, to_chunk=False)
            free[s].record(main)
    if join or not to_chunk:
        done = torch.cuda.Event()
        done.record(side)
        main.wait_event(done)
    for buf in ring:  # the side stream used them: keep the allocator from recycling them early
        buf.record_stream(side)
