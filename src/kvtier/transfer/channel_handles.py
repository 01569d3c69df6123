"""Export a tensor's memory as a channel handle, and map a peer's handle back to a tensor.

* **cuda**: CUDA IPC through torch's own primitives (``UntypedStorage._share_cuda_`` /
  ``_new_shared_cuda``, what ``torch.multiprocessing`` pickles), so torch's IPC reference
  counting still applies: the producer's caching allocator does not reuse a block while a
  consumer has it mapped. Works between processes on one host (same GPU, or GPUs with peer
  access); mapping fails otherwise, which the channel turns into the tier path.
* **shm**: a host tensor copied into a ``multiprocessing.shared_memory`` block (the producer's
  ``Exported.close`` unlinks it). For CPU engines on one host, and for testing the protocol
  without a GPU.

Invariant: an ``Exported`` keeps the memory its handle names alive until ``close()``; a mapped
tensor is only valid until ``Mapped.close()``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

from kvtier.chunk import dtype_from_name, dtype_name

from .channel_protocol import ChannelItemError, CudaHandle, Item, ShmHandle

log = logging.getLogger(__name__)

_CREATED: set[str] = set()
"""Names of the shm blocks this process exported (and will unlink)."""


@dataclass
class Exported:
    """A tensor offered to peers: the ``Item`` describing it and what keeps its memory alive."""

    item: Item
    nbytes: int
    keep: Any = None
    """The tensor itself (cuda) or the ``SharedMemory`` block (shm)."""

    def close(self) -> None:
        if isinstance(self.keep, shared_memory.SharedMemory):
            self.keep.close()
            self.keep.unlink()
            _CREATED.discard(self.keep.name)
        self.keep = None


def export(key: bytes, t: torch.Tensor) -> Exported:
    """``t`` as an ``Item`` a peer can map (cuda: ``t`` itself, not copied; host: a shm copy)."""
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cuda":
        st = t.untyped_storage()
        dev, handle, size, off, rc_handle, rc_off, ev_handle, ev_sync = st._share_cuda_()  # type: ignore[attr-defined]
        h = CudaHandle(
            int(dev),
            bytes(handle),
            int(size),
            int(off),
            bytes(rc_handle),
            int(rc_off),
            bytes(ev_handle) if ev_handle is not None else None,
            bool(ev_sync),
        )
        item = Item(key, h, dtype_name(t.dtype), list(t.shape), list(t.stride()), int(t.storage_offset()))
        return Exported(item, nbytes, t)
    c = t.detach().contiguous()
    shm = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
    _CREATED.add(shm.name)
    _drop_fd(shm)
    dst = (
        torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
        if nbytes
        else torch.empty(0, dtype=torch.uint8)
    )
    dst.copy_(c.reshape(-1).view(torch.uint8))
    del dst  # no export of shm.buf may outlive the block (close() would refuse)
    item = Item(key, ShmHandle(shm.name, nbytes), dtype_name(c.dtype), list(c.shape), list(c.stride()), 0)
    return Exported(item, nbytes, shm)


@dataclass
class Mapped:
    """A peer's tensor mapped into this process; ``tensor`` is valid until ``close()``."""

    tensor: torch.Tensor
    _shm: shared_memory.SharedMemory | None = field(default=None, repr=False)

    def close(self) -> None:
        self.tensor = torch.empty(0)
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:  # a view the caller kept still maps it: unmapped when that dies
                log.debug("channel: shared memory %s still referenced; left mapped", self._shm.name)
            self._shm = None


def map_item(item: Item) -> Mapped:
    """The tensor ``item`` describes. Raises ``RuntimeError``/``OSError`` when the memory cannot
    be mapped here (another host, no peer access), ``ValueError`` for an inconsistent item."""
    dtype = dtype_from_name(item.dtype)
    _check_bounds(item, dtype)
    h = item.handle
    if isinstance(h, CudaHandle):
        torch.cuda._lazy_init()  # type: ignore[no-untyped-call]
        st = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
            h.device,
            h.handle,
            h.size_bytes,
            h.offset_bytes,
            h.ref_counter_handle,
            h.ref_counter_offset,
            h.event_handle or b"",  # torch checks for bytes
            h.event_sync_required,
        )
        t = torch.empty(0, dtype=dtype, device=torch.device("cuda", h.device))
        t.set_(st, item.offset, item.shape, item.stride)
        return Mapped(t)
    shm = shared_memory.SharedMemory(name=h.name)
    _drop_fd(shm)
    # NOTE: attaching registers the block with this process's resource tracker (Python < 3.13),
    # which would unlink the producer's block when this process exits: it is not ours to unlink.
    # (A block this process created stays registered: its producer unlinks it.)
    if shm.name not in _CREATED:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    if shm.size < h.size_bytes:
        shm.close()
        raise ChannelItemError(
            f"shared memory block {h.name} holds {shm.size} bytes, the item claims {h.size_bytes}"
        )
    flat = (
        torch.frombuffer(shm.buf, dtype=dtype, count=h.size_bytes // dtype.itemsize)
        if h.size_bytes
        else torch.empty(0, dtype=dtype)
    )
    return Mapped(flat.as_strided(item.shape, item.stride, item.offset), shm)


def _drop_fd(shm: shared_memory.SharedMemory) -> None:
    """Close the block's file descriptor (the mapping stays): an outbox of thousands of chunks
    must not hold thousands of fds. ``SharedMemory.close`` skips an fd of -1."""
    fd = getattr(shm, "_fd", -1)
    if fd >= 0:
        os.close(fd)
        shm._fd = -1  # type: ignore[attr-defined]


def _check_bounds(item: Item, dtype: torch.dtype) -> None:
    """The view must lie inside the memory the handle names (a bad item never reads past it)."""
    if len(item.shape) != len(item.stride):
        raise ChannelItemError(f"item shape {item.shape} and stride {item.stride} differ in length")
    if math.prod(item.shape) == 0:
        return
    last = item.offset + sum((n - 1) * s for n, s in zip(item.shape, item.stride))
    size = item.handle.size_bytes
    if (last + 1) * dtype.itemsize > size:
        raise ChannelItemError(
            f"item view ends at byte {(last + 1) * dtype.itemsize}, past its {size}-byte memory"
        )
