"""Bulk host<->device copies of chunk tensors on the copy engine, ordered by CUDA events.

One long-lived side stream per device (``side_stream``) carries every kvtier DMA: the staging
ring of ``transfer.kernels.host``, the layer-wise loaders and the engine's GPU store/retrieve
(``copy_pairs`` here). A DMA is one flat ``cudaMemcpyAsync``; a strided device side (a token
range of a ``[L, 2, T, H, D]`` tensor) goes through a ring of device slots: a strided device
copy on the current stream makes or takes the packed bytes, the copy engine moves them on the
side stream, and slot ``i``'s next use waits for its previous DMA (or copy). So copy kernels
and DMAs of consecutive pairs overlap, the SMs do only the cheap device-side reshuffle, and
no byte goes through pageable host memory (the host sides are pinned pool views).

Stream contract: the side stream first waits for the current stream (the sources are final);
``copy_pairs`` returns with the current stream waiting for the last DMA, so work enqueued
next sees the device results, and an event on the side stream after the last DMA, which the
caller synchronises before reading the host results on the CPU *or* releasing host memory a
DMA reads. Device tensors touched on the side stream are ``record_stream``-ed there, so the
caching allocator never hands their memory out while a DMA still uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RING_SLOTS = 3
_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One long-lived copy stream per device (creating streams per call leaks handles)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _side_streams:
        _side_streams[idx] = torch.cuda.Stream(device=idx)
    return _side_streams[idx]


def copy_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.cuda.Event:
    """``dst.copy_(src)`` for every pair, host<->``device`` (one side of each pair on the host,
    the other on ``device``, same shape and dtype), in order, through the copy engine.

    Packed device sides are DMA'd directly; strided ones go through ``RING_SLOTS`` device slots
    sized for the largest strided pair. Returns the side-stream event after the last DMA (see
    the module's stream contract)."""
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    start = torch.cuda.Event()
    start.record(main)
    side.wait_event(start)
    strided = [
        (d if s.device.type == "cpu" else s)
        for s, d in pairs
        if not (d if s.device.type == "cpu" else s).is_contiguous()
    ]
    cap = max((t.numel() for t in strided), default=0)
    ring = [
        torch.empty(cap, dtype=strided[0].dtype, device=device) for _ in range(min(RING_SLOTS, len(strided)))
    ]
    free: list[torch.cuda.Event | None] = [None] * len(ring)
    used: list[torch.Tensor] = []
    i = 0
    for src, dst in pairs:
        to_host = dst.device.type == "cpu"
        dev_side = src if to_host else dst
        if dev_side.is_contiguous():
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
            used.append(dev_side)
            continue
        s = i % len(ring)
        i += 1
        slot = ring[s][: dev_side.numel()].view(dev_side.shape)
        if dev_side.dtype != slot.dtype:  # ring typed by the first strided pair; others get their own
            slot = torch.empty(dev_side.shape, dtype=dev_side.dtype, device=device)
            used.append(slot)
        ev = free[s]
        if to_host:
            if ev is not None:
                main.wait_event(ev)  # the slot's previous DMA is done
            slot.copy_(src)
            ready = torch.cuda.Event()
            ready.record(main)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                dst.copy_(slot, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
            free[s] = done
        else:
            if ev is not None:
                side.wait_event(ev)  # the slot's previous device copy is done
            with torch.cuda.stream(side):
                slot.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
            main.wait_event(ready)
            dst.copy_(slot)
            done = torch.cuda.Event()
            done.record(main)
            free[s] = done
    end = torch.cuda.Event()
    end.record(side)
    main.wait_event(end)
    for t in ring + used:
        t.record_stream(side)
    return end
