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
_side_streams: dict[int | tuple[int, int], torch.cuda.Stream] = {}
_aux_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device, which: int = 0) -> torch.cuda.Stream:
    """One long-lived copy stream per device (creating streams per call leaks handles);
    ``which=1``: a second one, for DMAs split over two streams (``transfer.grouped``)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    key = idx if which == 0 else (idx, which)
    if key not in _side_streams:
        _side_streams[key] = torch.cuda.Stream(device=idx)
    return _side_streams[key]


def aux_stream(device: torch.device) -> torch.cuda.Stream:
    """A second long-lived stream per device for small checks that must run beside the copies
    and the model (e.g. the engine's NaN/Inf sum over KV being stored) instead of before them."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _aux_streams:
        _aux_streams[idx] = torch.cuda.Stream(device=idx)
    return _aux_streams[idx]


def copy_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.cuda.Event:
    """``dst.copy_(src)`` for every pair, host<->``device`` (one side of each pair on the host,
    the other on ``device``, same shape and dtype), in order, through the copy engine.

    Packed device sides are DMA'd directly; strided ones go through ``RING_SLOTS`` device slots
    sized for the largest strided pair. Returns the side-stream event after the last DMA (see
    the module's stream contract)."""
    q = CopyQueue(device)
    for src, dst in pairs:
        q.copy(src, dst)
    return q.close()


class CopyQueue:
    """``copy_pairs`` for pairs handed in over time (chunk by chunk as a tier yields them, window
    by window as a store reserves them): the side stream waits for the current stream **once**,
    when the queue is made, and the ring slots live as long as the queue.

    Why: one ``copy_pairs`` call per chunk made every DMA wait for the current stream's work
    queued before the call, i.e. the previous chunk's slot copy, which itself waits for the
    previous DMA: DMA, copy kernel, DMA, ... serialised (~50 us per 32 MiB chunk, 0.9x memcpy
    at 32k tokens). Here consecutive pairs overlap as they do inside one ``copy_pairs`` call.

    Contract: the device sides are final on the current stream when the queue is made (later
    work on it is not waited for); ``copy`` returns the side-stream event after that pair's DMA
    (its host side may be released / read once the event completed); ``close`` makes the current
    stream wait for every DMA and returns the side-stream event after the last one. Use one
    queue at a time per device; always ``close`` it (also on errors)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._main = torch.cuda.current_stream(device)
        self._side = side_stream(device)
        self._after_main()
        self._ring: list[torch.Tensor] = []
        self._free: list[torch.cuda.Event | None] = []
        self._i = 0
        self._used: list[torch.Tensor] = []

    def _after_main(self) -> None:
        ev = torch.cuda.Event()
        ev.record(self._main)
        self._side.wait_event(ev)

    def _slot(self, like: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """A device slot shaped like ``like`` and its ring index (``None``: a one-off buffer)."""
        if not self._ring:
            # sized by the first strided pair (a store's or retrieve's chunks; only a tail is
            # smaller); allocated on the current stream after work queued since the queue was
            # made, so the side stream waits once more before it writes them
            self._ring = [
                torch.empty(like.numel(), dtype=like.dtype, device=self.device) for _ in range(RING_SLOTS)
            ]
            self._free = [None] * RING_SLOTS
            self._after_main()
        if like.numel() > self._ring[0].numel() or like.dtype != self._ring[0].dtype:
            one = torch.empty(like.shape, dtype=like.dtype, device=self.device)
            self._after_main()
            self._used.append(one)
            return one, None
        s = self._i % RING_SLOTS
        self._i += 1
        return self._ring[s][: like.numel()].view(like.shape), s

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> torch.cuda.Event:
        """Enqueue ``dst.copy_(src)`` (one side on the host, the other on the device)."""
        main, side = self._main, self._side
        to_host = dst.device.type == "cpu"
        dev_side = src if to_host else dst
        done = torch.cuda.Event()
        if dev_side.is_contiguous():
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
            done.record(side)
            self._used.append(dev_side)
            return done
        slot, s = self._slot(dev_side)
        ev = self._free[s] if s is not None else None
        if to_host:
            if ev is not None:
                main.wait_event(ev)  # the slot's previous DMA is done
            slot.copy_(src)
            ready = torch.cuda.Event()
            ready.record(main)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                dst.copy_(slot, non_blocking=True)
            done.record(side)
            if s is not None:
                self._free[s] = done
            return done
        if ev is not None:
            side.wait_event(ev)  # the slot's previous device copy is done
        with torch.cuda.stream(side):
            slot.copy_(src, non_blocking=True)
        done.record(side)
        main.wait_event(done)
        dst.copy_(slot)
        if s is not None:
            freed = torch.cuda.Event()
            freed.record(main)
            self._free[s] = freed
        return done

    def close(self) -> torch.cuda.Event:
        end = torch.cuda.Event()
        end.record(self._side)
        self._main.wait_event(end)
        for t in self._ring + self._used:
            t.record_stream(self._side)
        self._ring, self._used = [], []
        return end
