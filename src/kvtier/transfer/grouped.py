"""Layer-group pipelined load of host chunk pieces into paged per-layer KV tensors on CUDA.

The vLLM worker's load: ``pieces`` of pinned host chunks (``[L, P, n, H, D]`` each, the
CPU tier's pool views) must land in whole blocks of one tensor per layer, layer by layer as
the forward asks. A chunk's layers ``[l0, l1)`` are one contiguous block of host memory, so a
group of ``G`` layers costs one DMA per piece (``G`` MiB for a 256-token Llama-3-8B chunk)
instead of one per piece and layer: at 32k tokens that is 1k DMAs instead of 4k, and the
launch cost per DMA was what held the per-layer load at 0.78x of memcpy. The DMAs run on
``kvtier.devcopy.side_stream`` into a ring of ``RING`` group buffers in device memory, so the
groups after the current one load while it is scattered and the forward computes; a layer's
scatter (``index_put_`` of whole blocks per plane, on the current stream) waits for its group's
event only. So the copy engine never waits for the SMs and vice versa.

Invariants and reasons:
* A group's buffer is reused only after every layer of the group was scattered (an event on
  the current stream after the last scatter; the side stream waits for it before the next DMA).
* Groups are issued in order; a layer whose group cannot be issued yet (called out of order
  while the ring is full) is written from the pieces directly (``scatter_pieces``), so any call
  order is correct, in-order calls are fast.
* ``wait()`` returns once every issued DMA is done: only then may the pieces' host memory be
  released (the DMAs read it asynchronously).
* Eligibility (``GroupedLoad.plan``): every piece block-aligned and packed on the host;
  otherwise the caller keeps the per-layer path. Data is moved, never converted: bit-exact.
* On a CPU ``device`` the same code runs with synchronous copies and no events (what the CPU
  tests exercise: the address math, partial pieces, call orders); the worker uses it on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.devcopy import side_stream
from kvtier.transfer.blocks import TokenIndex, scatter_pieces
from kvtier.transfer.layout import KVLayout

RING = 2
DEFAULT_STAGING_BYTES = 512 << 20
"""Device memory for the ring (all ``RING`` group buffers together); sets the group size."""
COPY_STREAMS = 1
"""Copy streams a group's DMAs are spread over (1 or 2): with 2, two copy engines take turns,
so the per-DMA fixed cost (~3.4 us per 2 MiB DMA on the H200: 0.92x memcpy) may overlap."""
MAX_GROUP_LAYERS = 4
"""Past 4 MiB per DMA (4 layers of a 256-token 8-kv-head chunk) larger DMAs gain nothing."""


@dataclass
class LoadPieces:
    """One request's load: its token index and its pieces ``(chunk kv, first row, end row)``."""

    idx: TokenIndex
    pieces: list[tuple[torch.Tensor, int, int]]


@dataclass
class _Piece:
    kv: torch.Tensor  # [L, P, n, H, D] host
    offset: int  # element offset of the piece's group block in a group buffer
    rows: tuple[int, int]  # the rows [a, b) of the chunk to write
    dst: torch.Tensor  # destination block numbers of rows a..b (device, int64)


class GroupedLoad:
    """Loads ``LoadPieces`` layer group by layer group; call ``layer(i, entry)`` per layer."""

    def __init__(
        self,
        layout: KVLayout,
        loads: Sequence[LoadPieces],
        num_layers: int,
        device: torch.device,
        *,
        group_layers: int = 0,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        copy_streams: int | None = None,
    ) -> None:
        self.layout = layout
        self.copy_streams = max(1, min(2, COPY_STREAMS if copy_streams is None else copy_streams))
        self.loads = list(loads)
        self.num_layers = num_layers
        self.device = device
        bs = layout.block_size
        first = self.loads[0].pieces[0][0]
        self.dtype = first.dtype
        self.tail = tuple(int(x) for x in first.shape[3:])
        self.planes = int(first.shape[1])
        self._token_elems = self.planes * int(torch.Size(self.tail).numel())
        all_pieces = [(ld, kv, a, b) for ld in self.loads for kv, a, b in ld.pieces]
        layer_elems = sum(int(kv.shape[2]) for _, kv, _, _ in all_pieces) * self._token_elems
        if group_layers <= 0:
            fit = staging_bytes // max(1, RING * layer_elems * self.dtype.itemsize)
            group_layers = max(1, min(MAX_GROUP_LAYERS, fit))
        self.group_layers = min(group_layers, num_layers)
        self.num_groups = -(-num_layers // self.group_layers)
        # destination blocks of each piece, in load order
        dst_of: list[torch.Tensor] = []
        for ld in self.loads:
            wb, row = ld.idx.whole_blocks, 0
            assert wb is not None
            for _, a, b in ld.pieces:
                dst_of.append(wb[row // bs : (row + b - a) // bs])
                row += b - a
        # whole chunks of the most common size first, back to back in each group buffer: one
        # index_put per plane and layer writes all of them; the others (a request's first or
        # tail chunk) one index_copy_ each
        ct = int(first.shape[2])
        full = [
            i for i, (_, kv, a, b) in enumerate(all_pieces) if int(kv.shape[2]) == ct and (a, b) == (0, ct)
        ]
        rest = [i for i in range(len(all_pieces)) if i not in set(full)]
        self._chunk_tokens = ct
        self._pieces: list[_Piece] = []
        off = 0
        for i in full + rest:
            _, kv, a, b = all_pieces[i]
            self._pieces.append(_Piece(kv, off, (a, b), dst_of[i]))
            off += self.group_layers * int(kv.shape[2]) * self._token_elems
        self._group_elems = off
        self._n_full = len(full)
        self._full_dst = torch.stack([p.dst for p in self._pieces[: len(full)]]) if full else None
        self._ring: list[torch.Tensor | None] = [None] * RING
        self._slot_group: list[int | None] = [None] * RING
        self._free: list[Any] = [None] * RING  # CUDA events (None on the CPU)
        self._ready: dict[int, list[Any]] = {}
        self._done: list[set[int]] = [set() for _ in range(self.num_groups)]
        self._next = 0  # next group to issue
        self._cuda = device.type == "cuda"
        self._issued: set[int] = set()
        self._last_dma: list[Any] = []
        self.grouped_layers = 0
        """Layers written from the ring (the rest, called out of order, from the pieces)."""
        self._start = self._record(torch.cuda.current_stream(device) if self._cuda else None)
        self._issue_free()

    def _record(self, stream: Any) -> Any:
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    @staticmethod
    def plan(layout: KVLayout, loads: Sequence[LoadPieces], num_layers: int) -> bool:
        """Whether these loads can go through the ring (else: the per-layer path)."""
        bs = layout.block_size
        if not loads or any(ld.idx.whole_blocks is None or not ld.pieces for ld in loads):
            return False
        first = loads[0].pieces[0][0]
        for ld in loads:
            for kv, a, b in ld.pieces:
                if (
                    kv.device.type != "cpu"
                    or not kv.is_contiguous()
                    or kv.dim() != 5
                    or int(kv.shape[0]) != num_layers
                    or kv.dtype != first.dtype
                    or kv.shape[1] != first.shape[1]
                    or kv.shape[3:] != first.shape[3:]
                    or a % bs
                    or b % bs
                ):
                    return False
        return True

    # -- issuing --------------------------------------------------------------------------------
    def _layers(self, g: int) -> range:
        return range(g * self.group_layers, min((g + 1) * self.group_layers, self.num_layers))

    def _finished(self, g: int) -> bool:
        return len(self._done[g]) == len(self._layers(g))

    def _issue_free(self) -> None:
        """Issue groups in order while their ring slot is free."""
        while self._next < self.num_groups:
            g = self._next
            if self._finished(g):  # every layer already written from the pieces
                self._next += 1
                continue
            s = g % RING
            prev = self._slot_group[s]
            if prev is not None and not self._finished(prev):
                return
            self._issue(g, s)
            self._next += 1

    def _issue(self, g: int, s: int) -> None:
        if self._ring[s] is None:
            self._ring[s] = torch.empty(self._group_elems, dtype=self.dtype, device=self.device)
        buf = self._ring[s]
        assert buf is not None
        lays = self._layers(g)
        l0, l1 = lays.start, lays.stop
        dsts, srcs = [], []
        for p in self._pieces:
            n = int(p.kv.shape[2]) * self._token_elems * (l1 - l0)
            dsts.append(buf[p.offset : p.offset + n])
            srcs.append(p.kv[l0:l1].view(-1))
        k = self.copy_streams if self._cuda else 1
        events = []
        for j in range(k):  # pieces j, j+k, ... on copy stream j (their DMAs' fixed costs overlap)
            side = side_stream(self.device, j) if self._cuda else None
            if side is not None:
                side.wait_event(self._start)
                ev = self._free[s]
                if ev is not None:
                    side.wait_event(ev)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                torch._foreach_copy_(dsts[j::k], srcs[j::k], non_blocking=self._cuda)
            if side is not None:
                buf.record_stream(side)
            events.append(self._record(side))
        self._ready[g] = self._last_dma = events
        self._issued.add(g)
        self._slot_group[s] = g

    # -- per layer ------------------------------------------------------------------------------
    def layer(self, i: int, entry: torch.Tensor) -> None:
        """Write layer ``i`` of every load into ``entry`` (enqueued on the current stream)."""
        g = i // self.group_layers
        if i in self._done[g]:
            return
        if g >= self._next:
            self._issue_free()
        if self._holds(g):
            self._scatter_from_ring(i, g, entry)
            self.grouped_layers += 1
        else:  # out of order with the ring full: straight from the pieces
            for ld in self.loads:
                scatter_pieces(self.layout, entry, ld.idx, [kv[i, :, a:b] for kv, a, b in ld.pieces])
        self._done[g].add(i)
        if self._finished(g):
            if self._holds(g):
                self._free[g % RING] = self._record(
                    torch.cuda.current_stream(self.device) if self._cuda else None
                )
            self._issue_free()

    def _holds(self, g: int) -> bool:
        """Whether group ``g`` was issued and its ring slot still holds it."""
        return g in self._issued and self._slot_group[g % RING] == g

    def _scatter_from_ring(self, i: int, g: int, entry: torch.Tensor) -> None:
        if self._cuda:
            for ev in self._ready[g]:
                torch.cuda.current_stream(self.device).wait_event(ev)
        buf = self._ring[g % RING]
        assert buf is not None
        j = i - g * self.group_layers
        lay, bs, planes = self.layout, self.layout.block_size, self.planes
        gl = len(self._layers(g))
        if self._full_dst is not None:
            ct, nf = self._chunk_tokens, self._n_full
            region = buf[: nf * self.group_layers * ct * self._token_elems]
            full = region.view(nf, self.group_layers, planes, ct // bs, bs, *self.tail)
            for p in range(planes):
                lay.plane_view(entry, p)[self._full_dst] = full[:, j, p]
        for pc in self._pieces[self._n_full :]:
            n = int(pc.kv.shape[2])
            a, b = pc.rows
            view = buf[pc.offset : pc.offset + gl * n * self._token_elems].view(gl, planes, n, *self.tail)
            for p in range(planes):
                rows = view[j, p, a:b].reshape(-1, bs, *self.tail)
                lay.plane_view(entry, p).index_copy_(0, pc.dst, rows)

    def wait(self) -> None:
        """Block until every issued DMA is done (then the pieces' host memory may be released)."""
        for ev in self._last_dma:
            if ev is not None:
                ev.synchronize()
