"""Store/retrieve against an engine's paged KV: ``store_paged(engine, tokens, caches, slots)`` etc.

Functions over any object with the engine's ``store``/``retrieve``/``lookup`` (``CacheOps``;
``CacheEngine`` is one), plus ``kvtier.transfer.kernels``: the engine knows nothing of layouts.

* ``store_paged``: gather the tokens' slots into a (pinned) host chunk, then ``engine.store``.
* ``retrieve_paged``: ``engine.retrieve`` the longest cached prefix, then scatter its KV into the
  slots of those first ``num_tokens`` tokens; returns ``num_tokens``.
* layer-wise variants: per-layer copies on a side CUDA stream, ordered against the model's
  stream with events, so layer i's compute overlaps layer i+1's transfer.

Stream contract: on CUDA, ``retrieve_paged`` returns with the scatter *enqueued* on the current
stream (work the caller enqueues after it sees the KV); ``store_paged`` synchronises before
handing host memory to ``store``, because the tiers read it on the CPU.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvtier.transfer.kernels.host import gather, scatter, side_stream
from kvtier.transfer.kernels.ops import LayoutArg, Prepared, move_rows, prepare, rows_view
from kvtier.transfer.layout import LayerEntry, LayoutError, LayoutTypeError


class RetrievedKV(Protocol):
    @property
    def num_tokens(self) -> int: ...
    @property
    def kv(self) -> Any: ...


class CacheOps(Protocol):
    """What these functions need of an engine (``CacheEngine`` provides it)."""

    def store(self, tokens: Any, kv: torch.Tensor) -> int: ...
    def retrieve(self, tokens: Any) -> RetrievedKV: ...
    def lookup(self, tokens: Any) -> int: ...


def _check_lengths(tokens: Any, slot_mapping: torch.Tensor) -> int:
    if not isinstance(slot_mapping, torch.Tensor):
        raise LayoutTypeError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    n = len(tokens)
    if slot_mapping.dim() != 1 or slot_mapping.numel() != n:
        raise LayoutError(
            f"slot_mapping has shape {tuple(slot_mapping.shape)}, expected ({n},): one slot per token"
        )
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _prefix(kv: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` tokens of a retrieved ``[L, P, T, H, D]`` chunk (MLA too); a view."""
    return kv[:, :, :n]


@dataclass
class LayerwiseLoad:
    """Result of ``retrieve_paged_layerwise``: ``num_tokens`` now, the layers as you iterate.

    Iterating yields layer indices ``0 .. L-1``; when ``i`` is yielded, layer ``i``'s scatter is
    enqueued and the current stream waits for it, so compute enqueued next sees its KV. Iterate
    to the end (or call ``finish``) before the next request reuses the slots.
    """

    num_tokens: int
    _layers: Iterator[int] = field(default_factory=lambda: iter(()))

    def __iter__(self) -> Iterator[int]:
        return self._layers

    def finish(self) -> None:
        """Enqueue every remaining layer."""
        for _ in self._layers:
            pass


def store_paged(
    engine: CacheOps,
    tokens: Any,
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    *,
    layout: LayoutArg = None,
    mode: str = "auto",
) -> int:
    """Store the KV of ``tokens`` (at ``slot_mapping`` in ``kv_caches``); returns tokens newly stored."""
    _check_lengths(tokens, slot_mapping)
    kv = gather(kv_caches, slot_mapping, layout=layout, device="cpu", mode=mode)
    _sync(slot_mapping.device)
    return engine.store(tokens, kv)


def retrieve_paged(
    engine: CacheOps,
    tokens: Any,
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    *,
    layout: LayoutArg = None,
    mode: str = "auto",
) -> int:
    """Load the longest cached prefix of ``tokens`` into its slots; returns how many tokens were loaded."""
    _check_lengths(tokens, slot_mapping)
    r = engine.retrieve(tokens)
    n = int(r.num_tokens)
    if n == 0 or r.kv is None:
        return 0
    prep = prepare(kv_caches, slot_mapping[:n], layout)
    scatter(
        prep.entries,
        prep.slots,
        _prefix(r.kv, n),
        layout=prep.layout,
        mode=mode,
        check_slots=False,
    )
    if mode == "zero_copy":  # the kernel reads r.kv directly: keep it alive until done
        _sync(prep.device)
    return n


def retrieve_paged_layerwise(
    engine: CacheOps,
    tokens: Any,
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    *,
    layout: LayoutArg = None,
) -> LayerwiseLoad:
    """Like ``retrieve_paged``, one layer at a time: ``num_tokens`` at once, layers as iterated."""
    _check_lengths(tokens, slot_mapping)
    r = engine.retrieve(tokens)
    n = int(r.num_tokens)
    if n == 0 or r.kv is None:
        return LayerwiseLoad(0)
    prep = prepare(kv_caches, slot_mapping[:n], layout)
    rows = rows_view(_prefix(r.kv, n), prep)
    return LayerwiseLoad(n, _load_layers(prep, rows))


def store_paged_layerwise(
    engine: CacheOps,
    tokens: Any,
    kv_caches: Sequence[LayerEntry],
    slot_mapping: torch.Tensor,
    *,
    layout: LayoutArg = None,
) -> Generator[int, None, int]:
    """Yield each layer index before saving it: compute layer ``i`` while the generator is paused.

    ``for i in store_paged_layerwise(engine, ...): run_layer(i)``: after the loop, layer i's KV
    was copied out behind its compute and ``store`` was called; the generator's return
    value (``StopIteration.value``) is the number of tokens newly stored.
    """
    _check_lengths(tokens, slot_mapping)
    prep = prepare(kv_caches, slot_mapping, layout)
    lay, n_layers = prep.layout, len(prep.entries)
    cuda = prep.device.type == "cuda"
    out = torch.empty(lay.chunk_shape(n_layers, prep.slots.numel()), dtype=lay.dtype, pin_memory=cuda)
    rows = rows_view(out, prep)
    p = lay.num_planes
    if cuda:  # one staging buffer, reused in stream order on the side stream
        with torch.cuda.stream(side_stream(prep.device)):
            staging = torch.empty_like(rows[:p], device=prep.device)
    for layer in range(n_layers):
        yield layer
        if not cuda:
            move_rows(prep, layer * p, prep.slots, rows[layer * p : (layer + 1) * p], to_chunk=True)
            continue
        main, side = torch.cuda.current_stream(prep.device), side_stream(prep.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            move_rows(prep, layer * p, prep.slots, staging, to_chunk=True)
            rows[layer * p : (layer + 1) * p].copy_(staging, non_blocking=True)
    if cuda:
        side_stream(prep.device).synchronize()
    return engine.store(tokens, out)


def _load_layers(prep: Prepared, rows: torch.Tensor) -> Iterator[int]:
    """Scatter ``rows`` ([L*P, n, H*D], host or device) into the cache one layer at a time."""
    p = prep.layout.num_planes
    if prep.device.type != "cuda":
        for layer in range(len(prep.entries)):
            move_rows(prep, layer * p, prep.slots, rows[layer * p : (layer + 1) * p], to_chunk=False)
            yield layer
        return
    main, side = torch.cuda.current_stream(prep.device), side_stream(prep.device)
    side.wait_stream(main)  # the slots may still be read by work already enqueued
    with torch.cuda.stream(side):
        staging = torch.empty((p, rows.shape[1], rows.shape[2]), dtype=rows.dtype, device=prep.device)
    for layer in range(len(prep.entries)):
        with torch.cuda.stream(side):
            staging.copy_(rows[layer * p : (layer + 1) * p], non_blocking=True)
            move_rows(prep, layer * p, prep.slots, staging, to_chunk=False)
        main.wait_stream(side)
        yield layer
