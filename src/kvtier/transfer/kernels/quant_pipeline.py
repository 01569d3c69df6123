"""Packed chunks between GPU pages and pinned host memory with the kernels and PCIe overlapped.

``gather_quant`` then one D2H copy runs the quantize kernels and the copy one after the other:
for int4 the kernels' share (~20-30 % of the copy) kept a store at 2.6-2.8x memcpy against the
3.37x its ratio allows. Here the chunks are cut into ``groups``: group g's kernels run on the
current stream while group g-1's packed bytes cross PCIe on a copy stream (and the reverse
for loads), so only one group's kernel time is left exposed.

Group count: every group's ``gather_quant`` / ``scatter_dequant`` is one Triton launch over all
layers (the kernels' layer table), ~0.2 ms of host time a group at 16 groups. With a launch per
layer (64 a group for int4) the host paced the DMAs at 16 groups (3.3 ms a group: 1.7-2.6x
memcpy) and 4 groups left the first group's launches and kernels (4.2 ms) before the first DMA
(store 2.97x).
Measured with one launch (H200, 2026-12-02 09:12 UTC, ``benchmarks/bench_kv_codec_gpu.py --groups
4,8,16,32``), int4 store / load in raw bytes vs pinned memcpy: 3.08x / 3.23x at 4 groups, 3.18x /
3.27x at 8, 3.24x / 3.29x at 16, 3.25x / 3.28x at 32 (16 DMAs back to back, 0.02 ms of gaps).
``GROUPS = 16``: what is left is one group's kernels (1/16 of them) before the first DMA of a
store and after the last DMA of a load; 32 adds nothing measurable.

Stream contract: both functions return with the work enqueued; the current stream has waited
for the copy stream, so work enqueued next on it (or a ``synchronize``) sees everything done.
The device staging is allocated on the current stream and used by the copy stream, which is
recorded on it (``record_stream``), so the caching allocator never reuses it early.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.serde.kvcodec import KVCodecError
from kvtier.transfer.kernels.host import side_stream
from kvtier.transfer.kernels.quant_kernels import gather_quant, scatter_dequant

GROUPS = 16


def _bounds(n_chunks: int, groups: int) -> list[tuple[int, int]]:
    g = max(1, min(groups, n_chunks))
    step = -(-n_chunks // g)
    return [(a, min(a + step, n_chunks)) for a in range(0, n_chunks, step)]


def _check_host(host: torch.Tensor, what: str) -> None:
    if host.device.type != "cpu" or host.dtype != torch.uint8 or host.dim() != 2 or not host.is_contiguous():
        raise KVCodecError(
            f"{what} must be a contiguous [chunks, bytes] uint8 host tensor (pinned for overlap)"
        )


def store_overlapped(
    caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    codec_name: str,
    chunk_tokens: int,
    host_out: torch.Tensor,
    *,
    groups: int = GROUPS,
) -> None:
    """``host_out[:] = gather_quant(caches, slot_mapping, ...)``, group by group, D2H overlapped."""
    _check_host(host_out, "host_out")
    device = caches[0].device
    main = torch.cuda.current_stream(device)
    copy = side_stream(device)
    dev = torch.empty(host_out.shape, dtype=torch.uint8, device=device)
    dev.record_stream(copy)
    ct = chunk_tokens
    for a, b in _bounds(int(host_out.shape[0]), groups):
        gather_quant(caches, slot_mapping[a * ct : b * ct], codec_name, ct, out=dev[a:b])
        done = torch.cuda.Event()
        done.record(main)
        copy.wait_event(done)
        with torch.cuda.stream(copy):
            host_out[a:b].copy_(dev[a:b], non_blocking=True)
    main.wait_stream(copy)


def load_overlapped(
    host_in: torch.Tensor,
    caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    codec_name: str,
    chunk_tokens: int,
    *,
    groups: int = GROUPS,
) -> None:
    """``scatter_dequant(host_in, caches, slot_mapping, ...)`` with group g+1's H2D overlapping
    group g's kernels. ``host_in`` must stay unchanged until the current stream has run the work."""
    _check_host(host_in, "host_in")
    device = caches[0].device
    main = torch.cuda.current_stream(device)
    copy = side_stream(device)
    dev = torch.empty(host_in.shape, dtype=torch.uint8, device=device)
    dev.record_stream(copy)
    ct = chunk_tokens
    copy.wait_stream(main)  # the staging is main's memory: copy only once main got there
    bounds = _bounds(int(host_in.shape[0]), groups)
    events = []
    for a, b in bounds:
        with torch.cuda.stream(copy):
            dev[a:b].copy_(host_in[a:b], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(copy)
        events.append(ev)
    for (a, b), ev in zip(bounds, events, strict=True):
        main.wait_event(ev)
        scatter_dequant(dev[a:b], caches, slot_mapping[a * ct : b * ct], codec_name, ct)
