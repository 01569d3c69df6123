"""Cached segment rows on their way into the blend's ``KVBuffer``: copy, re-rotate, place.

``blend_prefill`` hands every validated segment chunk to a ``SegmentLoad`` (``add``), starts the
copies (``start``) and lets ``blend_forward`` pull layers in as it reaches them (``fill``):

* On CUDA the host -> device copies of each chunk run on kvtier's side stream
  (``devcopy.side_stream``, the copy engine), in layer groups from the first layer that reads
  cached rows: the check layer's group alone first, then ``GROUP_LAYERS`` at a time. So the
  transfer overlaps the layers that compute every token and the early selected layers; the
  compute stream waits only for the group it is about to read (an event per group).
* ``fill`` re-rotates the keys of the group on the device (the Triton kernel where present)
  and writes keys and values into the buffer's rows, on the compute stream.
* Elsewhere (CPU) the same steps run synchronously in ``fill``, straight from the tier's memory.

Invariants:
* A chunk stays pinned in its tier (not evicted, its memory not reused) until every copy
  reading it has completed: ``finish`` waits for the side stream's last event, then releases.
  ``finish`` is idempotent and must run on every path (``blend_prefill`` calls it in ``finally``).
* Layers below ``first`` are neither copied nor written (``blend_forward`` computes their rows).
* Staging tensors are allocated on the side stream (its own pool: no block the compute stream
  freed while its kernels may still use it, so the copies need not wait for the compute stream
  and start at once, while layer 0 runs) and ``record_stream``-ed on the compute stream when
  ``fill`` reads them, so the allocator never hands their memory out while a read is in flight.
  The side stream writes nothing but its staging tensors.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from kvtier.blend.forward import KVBuffer
from kvtier.blend.rope import RopeSpec, rerotate_keys
from kvtier.chunk import Chunk

GROUP_LAYERS = 8
"""Layers per copy group after the first. Host time, not bandwidth, was the limit: with groups of
4 (9 groups x 64 chunks, each re-rotated and placed on its own) placing rows took 230 ms of a
437 ms blend on the H200 (GPU_OUT/1); now each group is a few copies per chunk and a few ops per
segment run, and 8-layer groups still arrive well before the layers that read them."""


@dataclass
class _Piece:
    chunk: Chunk
    skip: int  # leading rows of the chunk not used (inside the exact prefix)
    old_start: int  # position the first used row was computed at
    new_start: int  # its position in the prompt
    staged: dict[int, torch.Tensor] = field(default_factory=dict)  # group start -> [g, 2, n, H, D]


class SegmentLoad:
    """Segment chunks copied into ``buf`` layer group by layer group (see the module docstring)."""

    def __init__(self, buf: KVBuffer, spec: RopeSpec, device: torch.device) -> None:
        self.buf, self.spec, self.device = buf, spec, device
        self.pieces: list[_Piece] = []
        self.groups: list[tuple[int, int]] = []
        self.events: dict[int, torch.cuda.Event] = {}
        self.filled: set[int] = set()
        self.first = 0
        self._done = False

    def add(self, chunk: Chunk, skip: int, old_start: int, new_start: int) -> None:
        """Use ``chunk``'s rows from ``skip`` on, computed at ``old_start..``, placed at ``new_start..``;
        the load owns the chunk from here (``finish`` releases it)."""
        self.pieces.append(_Piece(chunk, skip, old_start, new_start))

    @property
    def tokens(self) -> int:
        return sum(int(p.chunk.kv.shape[2]) - p.skip for p in self.pieces)

    def start(self, first: int) -> None:
        """Plan layer groups from ``first`` and, on CUDA, enqueue every copy on the side stream."""
        n_layers = self.buf.layers
        self.first = first
        bounds = [first, *range(first + 1, n_layers, GROUP_LAYERS), n_layers]
        self.groups = [(a, b) for a, b in itertools.pairwise(bounds) if a < b]
        if self.device.type != "cuda" or not self.pieces:
            return
        from kvtier.devcopy import side_stream

        side = side_stream(self.device)
        for a, b in self.groups:
            for p in self.pieces:
                src = p.chunk.kv[a:b, :, p.skip :]
                with torch.cuda.stream(side):  # allocated from the side stream's pool (see the module doc)
                    dst = torch.empty(src.shape, dtype=src.dtype, device=self.device)
                    dst.copy_(src, non_blocking=True)
                p.staged[a] = dst
            ev = torch.cuda.Event()
            ev.record(side)
            self.events[a] = ev

    def fill(self, layer: int, first: int) -> None:
        """Make the cached rows of ``layer``'s group present in the buffer (``blend_forward``'s ``Fill``).

        Pieces that continue each other (a segment's consecutive chunks) are re-rotated and
        placed as one run: one ``cat``, one re-rotation and two strided copies per run."""
        if layer < max(first, self.first):
            return
        group = next((g for g in self.groups if g[0] <= layer < g[1]), None)
        assert group is not None, f"layer {layer} outside the planned groups (first={self.first})"
        a, b = group
        if a in self.filled:
            return
        self.filled.add(a)
        ev = self.events.get(a)
        main = None
        if ev is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(ev)
        run: list[torch.Tensor] = []
        run_old = run_new = 0
        for p in self.pieces:
            kv = p.staged.pop(a, None)
            if kv is None:  # not staged (CPU): straight from the tier's memory
                kv = p.chunk.kv[a:b, :, p.skip :].to(self.device)
            elif main is not None:
                kv.record_stream(main)  # read below on the compute stream, freed after
            n_run = sum(int(t.shape[2]) for t in run)
            if run and (p.old_start != run_old + n_run or p.new_start != run_new + n_run):
                self._place(a, b, run, run_old, run_new)
                run = []
            if not run:
                run_old, run_new = p.old_start, p.new_start
            run.append(kv)
        if run:
            self._place(a, b, run, run_old, run_new)

    def _place(self, a: int, b: int, run: list[torch.Tensor], old_start: int, new_start: int) -> None:
        kv = run[0] if len(run) == 1 else torch.cat(run, dim=2)  # [g, 2, n, H, D]
        n = int(kv.shape[2])
        keys = kv[:, 0]
        if old_start != new_start:
            old = torch.arange(old_start, old_start + n, device=self.device)
            new = torch.arange(new_start, new_start + n, device=self.device)
            keys = rerotate_keys(keys, old, new, self.spec)
        self.buf.put_plane(slice(a, b), 0, new_start, keys)
        self.buf.put_plane(slice(a, b), 1, new_start, kv[:, 1])

    def finish(self) -> None:
        """Wait for every copy, then release the chunks (idempotent)."""
        if self._done:
            return
        self._done = True
        for ev in self.events.values():
            ev.synchronize()
        for p in self.pieces:
            p.staged.clear()
            p.chunk.release()
