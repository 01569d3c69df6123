"""Packed chunks between GPU pages and pinned host memory with the kernels and PCIe overlapped.

``gather_quant`` then one D2H copy runs the quantize kernels and the copy one after the other:
for int4 the kernels' share (~20 % of the copy) kept a store at 2.7x memcpy against the
3.3x its ratio allows. Here the chunks are cut into ``groups``: group g's kernels run on the
current stream while group g-1's packed bytes cross PCIe on a copy stream (and the reverse
for loads), so only one group's kernel time is left exposed.

Group count: each group's ``gather_quant`` / ``scatter_dequant`` is launch-bound on the host
(two Triton launches per layer for int4, 64 per group, ~28 us each) whatever its size: 3.3 ms
per group at 16 groups, so the host (53 ms) paced the PCIe copies (23 ms for int4 at 32k
tokens) and the overlapped path ran at 1.7-2.6x memcpy, below the serial 2.7-2.8x (H200,
2026-12-02, ``benchmarks/profile_gpu_gaps.py --parts quant``). With ``GROUPS = 4`` (1.8 ms a
group) the DMAs run back to back: store 2.97x, load 3.20x memcpy in raw bytes (same run:
serial 2.72x / 2.99x). What is left of a store is the first group's launches before its DMA.

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

GROUPS = 4


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
