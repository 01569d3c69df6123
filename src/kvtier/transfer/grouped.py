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
* While chunks stream in (``feed``) only group 0 is copied; group 1 follows at ``attach``
  as one DMA per run of kept pieces. Feeding both groups chunk by chunk interleaved their
  DMAs, so both finished together and the copy engine sat idle while group 0 was scattered
  (group 2 waits for that scatter); now group 1's DMA runs during it (H200, 32k tokens:
  ``benchmarks/probe_worker_lead.py``).
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
from kvtier.devcopy2d import Copy2D, PinnedStorages, Rows, add_row, available, copy_rows
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
ROWS2D = True
"""One 2D DMA (``devcopy2d``) per run of pieces lying at a constant pitch in host memory (chunks
the CPU tier stored one after another) instead of one DMA per piece. H200, 4 GiB in 128 chunks:
one DMA per piece reached 0.86 / 0.93 / 0.96x of a flat memcpy for 1 / 2 / 4-layer groups (the
copy engine's fixed cost per DMA), one 2D DMA per group 0.998-1.0x at every group size
(``benchmarks/bench_dma_shapes.py``). ``False``: one DMA per piece (the path before; also used
where the runtime's ``cudaMemcpy2DAsync`` is not found, or a piece is not in pinned memory)."""
FEED_BATCH = 8
"""Fed pieces per batch of first-group DMAs while chunks stream in (2D runs of up to 8 rows, not
one small DMA each). Batches grow from ``FIRST_FEED_BATCH``, doubling: the first DMA starts as
soon as one chunk is validated, and each batch's DMAs last about as long as feeding the next."""
FIRST_FEED_BATCH = 1


_SPARE: dict[tuple[str, torch.dtype], list[tuple[torch.Tensor, Any]]] = {}
"""Ring buffers of finished loads, per device and dtype, with the event they are free after."""


@dataclass
class LoadPieces:
    """One request's load: its token index and its pieces ``(chunk kv, first row, end row)``."""

    idx: TokenIndex
    pieces: list[tuple[torch.Tensor, int, int]]


@dataclass
class _Piece:
    n: int  # the chunk's rows (tokens)
    offset: int  # element offset of the piece's group block in a group buffer
    rows: tuple[int, int]  # the rows [a, b) of the chunk to write
    kv: torch.Tensor | None = None  # [L, P, n, H, D] host, once fed
    dst: torch.Tensor | None = None  # destination block numbers of rows a..b (device, int64), once attached


Geometry = Sequence[Sequence[tuple[int, int, int]]]
"""Per load, per piece in load order: ``(chunk rows n, first row a, end row b)``."""


class GroupedLoad:
    """Loads ``LoadPieces`` layer group by layer group; call ``layer(i, entry)`` per layer.

    Two ways to make one: ``GroupedLoad(layout, loads, ...)`` with every piece known, or
    ``GroupedLoad.streamed(layout, geometry, ...)`` from the pieces' sizes alone (known from
    the chunk keys before any chunk is fetched), then ``feed(i, kv)`` per piece as each chunk
    is fetched and validated (its DMAs for group 0 start right away, in batches), then
    ``attach(loads)`` with the pieces that made it (a prefix of each load's planned pieces,
    the last possibly trimmed). The first way is the second with all pieces fed at once."""

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
        first = loads[0].pieces[0][0]
        geometry = [[(int(kv.shape[2]), a, b) for kv, a, b in ld.pieces] for ld in loads]
        self._setup(
            layout,
            geometry,
            num_layers,
            device,
            first.dtype,
            int(first.shape[1]),
            tuple(int(x) for x in first.shape[3:]),
            group_layers,
            staging_bytes,
            copy_streams,
        )
        i = 0
        for ld in loads:
            for kv, _, _ in ld.pieces:
                fed = self.feed(i, kv)
                assert fed, "GroupedLoad.plan() first"
                i += 1
        attached = self.attach(list(enumerate(loads)))
        assert attached, "GroupedLoad.plan() first"

    @classmethod
    def streamed(
        cls,
        layout: KVLayout,
        geometry: Geometry,
        num_layers: int,
        device: torch.device,
        *,
        group_layers: int = 0,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        copy_streams: int | None = None,
    ) -> GroupedLoad | None:
        """A load planned from piece sizes (``None`` if they cannot go through the ring: empty, or
        a piece not block-aligned); the chunks' dtype and shape are the layout's."""
        bs = layout.block_size
        if not any(geometry):  # rows may be empty (a request with nothing cached)
            return None
        if any(a % bs or b % bs or not 0 <= a < b <= n for g in geometry for n, a, b in g):
            return None
        self = cls.__new__(cls)
        shape = layout.chunk_shape(num_layers, 1)
        self._setup(
            layout,
            geometry,
            num_layers,
            device,
            layout.dtype,
            int(shape[1]),
            tuple(int(x) for x in shape[3:]),
            group_layers,
            staging_bytes,
            copy_streams,
        )
        return self

    def _setup(
        self,
        layout: KVLayout,
        geometry: Geometry,
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        planes: int,
        tail: tuple[int, ...],
        group_layers: int,
        staging_bytes: int,
        copy_streams: int | None,
    ) -> None:
        self.layout = layout
        self.copy_streams = max(1, min(2, COPY_STREAMS if copy_streams is None else copy_streams))
        self.loads: list[LoadPieces] = []
        self.num_layers = num_layers
        self.device = device
        self.dtype = dtype
        self.tail = tail
        self.planes = planes
        self._token_elems = self.planes * int(torch.Size(self.tail).numel())
        flat = [piece for g in geometry for piece in g]
        self._geometry_sizes = [len(g) for g in geometry]
        layer_elems = sum(n for n, _, _ in flat) * self._token_elems
        if group_layers <= 0:
            fit = staging_bytes // max(1, RING * layer_elems * self.dtype.itemsize)
            group_layers = max(1, min(MAX_GROUP_LAYERS, fit))
        self.group_layers = min(group_layers, num_layers)
        self.num_groups = -(-num_layers // self.group_layers)
        # whole chunks of the largest size first, back to back in each group buffer: one
        # index_put per plane and layer writes all of them; the others (a request's first or
        # tail chunk) one index_copy_ each
        ct = max(n for n, _, _ in flat)
        full = [i for i, (n, a, b) in enumerate(flat) if n == ct and (a, b) == (0, ct)]
        fullset = set(full)
        rest = [i for i in range(len(flat)) if i not in fullset]
        self._chunk_tokens = ct
        self._planned: list[_Piece] = [_Piece(0, 0, (0, 0))] * len(flat)  # in load order
        self._pieces: list[_Piece] = []  # in ring order
        off = 0
        for i in full + rest:
            n, a, b = flat[i]
            self._planned[i] = _Piece(n, off, (a, b))
            self._pieces.append(self._planned[i])
            off += self.group_layers * n * self._token_elems
        self._group_elems = off
        self._n_full = 0
        self._full_dst: torch.Tensor | None = None
        self._cuda = device.type == "cuda"
        # the first groups' buffers exist before the side streams' start event: their DMAs
        # may begin as soon as the first piece is fed
        self._ring: list[torch.Tensor | None] = [None] * RING
        self._open = min(RING, self.num_groups)
        self._bases: list[torch.Tensor] = []  # the ring's buffers as allocated (``recycle`` keeps them)
        self._waits: list[Any] = []  # events the DMAs into recycled buffers wait for
        for s in range(self._open):
            self._ring[s] = self._buffer()
        self._slot_group: list[int | None] = [None] * RING
        self._free: list[Any] = [None] * RING  # CUDA events (None on the CPU)
        self._ready: dict[int, list[Any]] = {}
        self._done: list[set[int]] = [set() for _ in range(self.num_groups)]
        self._next = 0  # next group to issue
        self._issued: set[int] = set()
        self._last_dma: dict[int, Any] = {}
        """Per copy stream, the event after the last DMA issued on it."""
        self._fed_streams: set[int] = set()
        self._attached = False
        self.grouped_layers = 0
        """Layers written from the ring (the rest, called out of order, from the pieces)."""
        self._copier: Copy2D | None = available() if self._cuda and ROWS2D else None
        self._rows2d = ROWS2D and (self._copier is not None or not self._cuda)
        """2D runs: on CUDA through the runtime, on the CPU through strided views (what the tests run)."""
        self._pending: list[_Piece] = []  # fed pieces whose group-0 DMAs wait for a batch
        self._batch = max(1, min(FIRST_FEED_BATCH, FEED_BATCH))
        self._pinned = PinnedStorages()
        self._start = self._record(torch.cuda.current_stream(device) if self._cuda else None)
        if self._cuda:
            for j in range(self.copy_streams):
                side_stream(device, j).wait_event(self._start)
                for ev in self._waits:
                    side_stream(device, j).wait_event(ev)

    def feed(self, i: int, kv: torch.Tensor) -> bool:
        """Planned piece ``i`` (load order) is chunk ``kv``: its DMAs for group 0 are
        issued now (in batches). ``False`` (nothing issued) if ``kv`` cannot go through the ring (not a
        contiguous host chunk of the planned size, dtype and shape): the caller ``abandon``s."""
        p = self._planned[i]
        if (
            kv.device.type != "cpu"
            or not kv.is_contiguous()
            or kv.dim() != 5
            or int(kv.shape[0]) != self.num_layers
            or kv.dtype != self.dtype
            or int(kv.shape[1]) != self.planes
            or int(kv.shape[2]) != p.n
            or tuple(int(x) for x in kv.shape[3:]) != self.tail
            or p.kv is not None
        ):
            return False
        p.kv = kv
        if self._rows2d and not self._pinned_host(kv):
            self._rows2d = False  # a pageable piece: one DMA per piece, as torch stages it
            self._flush()
        if self._rows2d:
            self._pending.append(p)
            if len(self._pending) >= self._batch:
                self._flush()
                self._batch = min(FEED_BATCH, 2 * self._batch)
            return True
        j = i % self.copy_streams if self._cuda else 0
        side = side_stream(self.device, j) if self._cuda else None
        self._fed_streams.add(j)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            buf = self._ring[0]
            assert buf is not None
            lays = self._layers(0)
            n = p.n * self._token_elems * len(lays)
            src = kv[lays.start : lays.stop].view(-1)
            buf[p.offset : p.offset + n].copy_(src, non_blocking=self._cuda)
        return True

    def _pinned_host(self, kv: torch.Tensor) -> bool:
        return not self._cuda or self._pinned(kv)

    def _runs(self, pieces: Sequence[_Piece], buf: torch.Tensor, lays: range) -> list[Rows]:
        """The DMAs of ``pieces``' layers ``lays`` into ``buf``: equally spaced neighbours as one run."""
        isz = self.dtype.itemsize
        out: list[Rows] = []
        for p in pieces:
            assert p.kv is not None
            per_layer = p.n * self._token_elems * isz
            width = per_layer * len(lays)
            src_ptr = p.kv.data_ptr() + lays.start * per_layer
            dst_ptr = buf.data_ptr() + p.offset * isz
            add_row(out, p.kv, src_ptr, buf, dst_ptr, width)
        return out

    def _flush(self) -> None:
        """Issue group 0's DMAs of the pieces fed since the last batch (copy stream 0)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        side = side_stream(self.device, 0) if self._cuda else None
        self._fed_streams.add(0)
        buf = self._ring[0]
        assert buf is not None
        for run in self._runs(pending, buf, self._layers(0)):
            copy_rows(run, side, self._copier)

    def attach(self, loads: Sequence[tuple[int, LoadPieces]]) -> bool:
        """The loads as they turned out, each with the index of its plan (``geometry``'s row):
        its pieces must be the first ones fed for that row, in order, rows ``(a, b)`` as
        planned but for the last, which may end earlier. Ends group 0's DMAs (events) and
        issues group 1's for the kept pieces; returns ``False`` (the caller ``abandon``s) if the loads do not fit the plan."""
        assert not self._attached
        self._flush()
        starts, at = [], 0
        for g in self._geometry_sizes:
            starts.append(at)
            at += g
        kept: set[int] = set()
        for row, ld in loads:
            for j, (kv, a, b) in enumerate(ld.pieces):
                if row >= len(starts) or j >= self._geometry_sizes[row]:
                    return False
                p = self._planned[starts[row] + j]
                last = j == len(ld.pieces) - 1
                if p.kv is not kv or a != p.rows[0] or not (b == p.rows[1] or (last and a < b < p.rows[1])):
                    return False
                p.rows = (a, b)
                kept.add(starts[row] + j)
        if not kept:
            return False
        self.loads = [ld for _, ld in loads]
        bs = self.layout.block_size
        for row, ld in loads:
            wb, r = ld.idx.whole_blocks, 0
            if wb is None:
                return False
            for j, (_, a, b) in enumerate(ld.pieces):
                self._planned[starts[row] + j].dst = wb[r // bs : (r + b - a) // bs]
                r += b - a
        ct = self._chunk_tokens
        nf = 0  # the leading whole chunks in ring order, back to back from offset 0, all kept:
        for p in self._pieces:  # one index_put per plane writes them; any other kept piece its own
            if p.dst is None or (p.n, *p.rows) != (ct, 0, ct):
                break
            nf += 1
        ring_kept = [p for p in self._pieces if p.dst is not None]
        self._pieces = ring_kept
        self._n_full = nf
        self._full_dst = torch.stack([p.dst for p in ring_kept[:nf] if p.dst is not None]) if nf else None
        self._attached = True
        streams = sorted(self._fed_streams)
        events = [self._record(side_stream(self.device, j) if self._cuda else None) for j in streams]
        buf = self._ring[0]
        assert buf is not None
        if self._cuda:
            for j in self._fed_streams:
                buf.record_stream(side_stream(self.device, j))
        self._ready[0] = events
        self._issued.add(0)
        self._slot_group[0] = 0
        self._next = 1
        self._last_dma = dict(zip(streams, events, strict=True))
        self._issue_free()  # group 1 (the ring's other slot) for the kept pieces, one DMA per run
        return True

    def abandon(self) -> None:
        """Drop a load that will not go through the ring: waits for the DMAs already issued
        (they read the fed chunks, which the caller may release only after this)."""
        self._pending = []  # fed, never issued: no DMA reads them
        if self._cuda:
            for j in sorted(self._fed_streams):
                ev = self._record(side_stream(self.device, j))
                ev.synchronize()
        self._fed_streams = set()

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
            self._ring[s] = self._buffer()
        buf = self._ring[s]
        assert buf is not None
        lays = self._layers(g)
        # 2D runs go on copy stream 0; one DMA per piece spreads pieces j, j+k, ... over copy
        # stream j (their DMAs' fixed costs overlap)
        k = 1 if self._rows2d or not self._cuda else self.copy_streams
        events = []
        for j in range(k):
            mine = self._pieces[j::k]
            if not mine:
                continue
            side = side_stream(self.device, j) if self._cuda else None
            if side is not None:
                side.wait_event(self._start)
                for ev in self._waits:
                    side.wait_event(ev)
                if self._free[s] is not None:
                    side.wait_event(self._free[s])
            if self._rows2d:
                for run in self._runs(mine, buf, lays):
                    copy_rows(run, side, self._copier)
            else:
                dsts, srcs = [], []
                for p in mine:
                    assert p.kv is not None
                    dsts.append(buf[p.offset : p.offset + p.n * self._token_elems * len(lays)])
                    srcs.append(p.kv[lays.start : lays.stop].view(-1))
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    torch._foreach_copy_(dsts, srcs, non_blocking=self._cuda)
            if side is not None:
                buf.record_stream(side)
            events.append(self._record(side))
            self._last_dma[j] = events[-1]
        self._ready[g] = events
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
            n = pc.n
            a, b = pc.rows
            assert pc.dst is not None
            view = buf[pc.offset : pc.offset + gl * n * self._token_elems].view(gl, planes, n, *self.tail)
            for p in range(planes):
                rows = view[j, p, a:b].reshape(-1, bs, *self.tail)
                lay.plane_view(entry, p).index_copy_(0, pc.dst, rows)

    def _buffer(self) -> torch.Tensor:
        """A ring buffer of ``_group_elems``: a recycled one that is large enough, else a new one.
        NOTE: a fresh 256 MiB device buffer per step cost ~4 ms of host time before the first
        DMA on the H200 (the caching allocator did not hand the last step's blocks back)."""
        spare = _SPARE.get((str(self.device), self.dtype), [])
        while spare:
            base, ev = spare.pop()
            if base.numel() >= self._group_elems:
                if ev is not None:
                    self._waits.append(ev)
                self._bases.append(base)
                return base[: self._group_elems]
        base = torch.empty(self._group_elems, dtype=self.dtype, device=self.device)
        self._bases.append(base)
        return base

    def recycle(self) -> None:
        """After ``wait``: hand the ring's buffers to the next load of this device and dtype (at most
        ``RING`` kept, the largest). Its DMAs wait for an event recorded here, on the stream the
        scatters that read the buffers ran on, so no scatter can see a later load's bytes."""
        if not self._bases:
            return
        key = (str(self.device), self.dtype)
        ev = self._record(torch.cuda.current_stream(self.device) if self._cuda else None)
        spare = _SPARE.setdefault(key, [])
        spare.extend((b, ev) for b in self._bases)
        spare.sort(key=lambda be: be[0].numel())
        del spare[: max(0, len(spare) - RING)]
        self._bases = []
        self._ring = [None] * RING

    def wait(self) -> None:
        """Block until every issued DMA is done (then the pieces' host memory may be released)."""
        for ev in self._last_dma.values():
            if ev is not None:
                ev.synchronize()
