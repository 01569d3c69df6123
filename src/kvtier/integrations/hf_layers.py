"""A transformers cache layer that keeps its KV in one preallocated buffer and writes in place.

``DynamicLayer.update`` is ``keys = torch.cat([keys, new])``: every call copies the whole past.
On a kvtier hit that is two full-size copies per layer and plane before the first token (installing
the loaded prefix onto an empty tensor, then appending the one computed token) and one more per
decoded token. ``InPlaceLayer`` holds ``buf`` ``[P, B, capacity, H, W]``, in kvtier's chunk-row
order (token-major: one position's heads are contiguous), and its ``keys``/``values`` are views of
its first ``n`` positions: an update writes positions ``[n, n + t)`` and republishes the views.

Planes: ``P = 2`` (keys plane 0, values plane 1, each ``[H, D]`` per position) for attention
layers; ``P = 1`` with ``split`` for an MLA latent (keys ``[..., :split]``, values
``[..., split:]``, ``H = 1``): the very row kvtier stores, so a loaded prefix is a block copy.

Why token-major: a loaded prefix arrives as chunk rows ``[P, n, H, W]``, so filling it is a plain
copy per plane (no transpose); attention kernels take ``[B, H, T, D]`` views with any strides but a
unit last one (FlashAttention's native layout is ``[B, T, H, D]``); storing the cache back reads
contiguous rows.

Invariants:
* ``keys``/``values`` are the views this layer published last, of ``buf[:, :, :n]``. Nothing is
  copied on an update unless the capacity is exceeded; then the buffer grows by half (at least
  ``GROW_MIN`` positions), one copy, amortised over the positions it makes room for.
* Anything else that replaces ``keys``/``values`` (transformers' ``reorder_cache``,
  ``batch_repeat_interleave``, ``batch_select_indices``, ``offload``/``prefetch``, a caller) is
  adopted by the next update: copied into a fresh buffer (what ``cat`` would have cost), so the
  views are right again. ``crop`` stays in place. ``reset`` drops the buffer.
* Keys and values whose heads differ (no known model) fall back to ``DynamicLayer``'s ``cat``.
* ``defer`` (a miss: nothing will be loaded into the layer): the prompt's first update is held
  as computed, like ``DynamicLayer`` does, and copied into a buffer by the next update (the first
  decoded token). Why: attention over the buffer's strided views, plus the copy into it, made a
  recomputed prefill 1-2 % slower than plain transformers' (``bench_load_cost.py``: the goal is
  <= 2 %); the one copy moves after the first token, where ``cat`` would have paid it anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvtier.errors import KVTierError

__all__ = ["GROW_MIN", "InPlaceLayer", "LayerGeometryError"]

GROW_MIN = 256
"""Positions added at least when a buffer grows (decode steps past the capacity)."""


class LayerGeometryError(KVTierError, ValueError):
    """KV handed to an ``InPlaceLayer`` does not fit the geometry its buffer was made for."""


class InPlaceLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of one buffer written in place (module doc)."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity_hint = int(capacity)
        """Positions to allocate for at least (prompt + tokens to generate), 0: what arrives."""
        self.buf: torch.Tensor | None = None
        self.split: int | None = None
        self.n = 0
        self._fallback = False
        self._pub: tuple[Any, Any] = (None, None)  # the (keys, values) views published last
        self.defer = False
        """Hold the first update's tensors as they are (no buffer, no copy) until a second one
        arrives: set by ``KVTierCache`` for a miss (module doc)."""
        self._plain = False  # keys/values are a deferred first update's tensors, no buffer yet

    # -- geometry and storage ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else int(self.buf.shape[2])

    def reserve(
        self,
        batch: int,
        planes: int,
        heads: int,
        width: int,
        split: int | None,
        dtype: torch.dtype,
        device: torch.device,
        tokens: int,
    ) -> torch.Tensor:
        """Make an empty buffer for ``max(tokens, capacity_hint)`` positions and return it
        (``[P, B, cap, H, W]``): a loader writes a prefix into ``buf[:, :, :n]``, then calls
        ``filled(n)``."""
        if planes not in (1, 2) or (planes == 1) != (split is not None):
            raise LayerGeometryError(
                f"planes {planes} with split {split}: 2 planes, or 1 latent plane with a split"
            )
        cap = max(int(tokens), self.capacity_hint, 1)
        self.buf = torch.empty((planes, batch, cap, heads, width), dtype=dtype, device=device)
        self.split = split
        self.n = 0
        self.dtype, self.device = dtype, device  # transformers 5.19's lazy_initialization sets both
        self.is_initialized = True
        self._publish()
        return self.buf

    def filled(self, n: int) -> None:
        """The first ``n`` positions of ``buf`` now hold KV (written by a loader)."""
        if n > self.capacity:
            raise LayerGeometryError(f"{n} positions filled in a buffer of {self.capacity}")
        self.n = int(n)
        self._publish()

    def _views(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, b - a, D]`` views of positions ``[a, b)`` (keys, values)."""
        assert self.buf is not None
        if self.split is None:
            return self.buf[0, :, a:b].transpose(1, 2), self.buf[1, :, a:b].transpose(1, 2)
        row = self.buf[0, :, a:b].transpose(1, 2)
        return row[..., : self.split], row[..., self.split :]

    def _publish(self) -> None:
        self.keys, self.values = self._views(0, self.n)
        self._pub = (self.keys, self.values)

    def _geometry_of(self, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int | None] | None:
        """(planes, width, split) for keys/values like ``k``/``v``, ``None`` if no buffer fits."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            return None
        if k.shape == v.shape:
            return 2, int(k.shape[-1]), None
        return 1, int(k.shape[-1]) + int(v.shape[-1]), int(k.shape[-1])

    def _alloc_for(self, k: torch.Tensor, v: torch.Tensor, tokens: int) -> bool:
        geo = self._geometry_of(k, v)
        if geo is None:
            return False
        planes, width, split = geo
        self.reserve(int(k.shape[0]), planes, int(k.shape[1]), width, split, k.dtype, k.device, tokens)
        return True

    def _ensure(self, need: int) -> None:
        """Room for ``need`` positions: grow by half (>= ``GROW_MIN``), copying the ``n`` held."""
        assert self.buf is not None
        cap = self.capacity
        if need <= cap:
            return
        new_cap = max(need, cap + max(cap // 2, GROW_MIN))
        p, b, _, h, w = self.buf.shape
        buf = torch.empty((p, b, new_cap, h, w), dtype=self.buf.dtype, device=self.buf.device)
        buf[:, :, : self.n].copy_(self.buf[:, :, : self.n])
        self.buf = buf

    def _adopt_replaced(self) -> None:
        """If ``keys``/``values`` are no longer the published views, copy them into a new buffer."""
        if self.buf is None or self._fallback:
            return
        pub_k, pub_v = self._pub
        if self.keys is pub_k and self.values is pub_v:
            return
        k, v = self.keys, self.values
        cap = self.capacity
        self.buf = None
        if k is None or v is None:  # reset: start over
            self.n = 0
            return
        n = int(k.shape[-2])
        if not self._alloc_for(k, v, max(n, cap)):
            self._fallback = True
            return
        self._views(0, n)[0].copy_(k)
        self._views(0, n)[1].copy_(v)
        self.n = n
        self._publish()

    # -- the CacheLayerMixin API -------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._adopt_replaced()
        if self._fallback:
            return super().update(key_states, value_states, *args, **kwargs)
        t = int(key_states.shape[-2])
        if self.buf is None and self._plain:  # the prompt's own tensors: now into a buffer
            self._plain = False
            if not self._take_plain():
                self._fallback = True
                return super().update(key_states, value_states, *args, **kwargs)
        if self.buf is None:
            if t == 0:  # nothing to hold yet: the buffer is made by the first real update
                return key_states, value_states
            if self.defer:  # a miss's prompt: attend over the tensors as computed (module doc)
                self.keys, self.values, self.n, self._plain = key_states, value_states, t, True
                return key_states, value_states
            if not self._alloc_for(key_states, value_states, t):
                self._fallback = True
                self.keys = self.values = None
                self.is_initialized = False
                return super().update(key_states, value_states, *args, **kwargs)
        self._check(key_states, value_states)
        self._ensure(self.n + t)
        kd, vd = self._views(self.n, self.n + t)
        kd.copy_(key_states)
        vd.copy_(value_states)
        self.n += t
        self._publish()
        return self.keys, self.values  # type: ignore[return-value]

    def _take_plain(self) -> bool:
        """Copy the held ``keys``/``values`` (a deferred prompt's, or what replaced them) into a
        buffer for ``capacity_hint`` positions; ``False`` where no buffer fits them."""
        k, v = self.keys, self.values
        assert k is not None and v is not None
        n = int(k.shape[-2])
        if not self._alloc_for(k, v, max(n, self.capacity_hint)):
            return False
        self._views(0, n)[0].copy_(k)
        self._views(0, n)[1].copy_(v)
        self.n = n
        self._publish()
        return True

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        assert self.buf is not None
        kd, vd = self._views(0, 0)
        for name, got, want in (("keys", k, kd), ("values", v, vd)):
            if (
                got.dim() != 4
                or got.shape[0] != want.shape[0]
                or got.shape[1] != want.shape[1]
                or (got.shape[3] != want.shape[3])
            ):
                raise LayerGeometryError(
                    f"{name} {tuple(got.shape)} do not fit this layer's buffer (batch, heads, width "
                    f"{want.shape[0]}, {want.shape[1]}, {want.shape[3]})"
                )

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._pub = (self.keys, self.values)

    def crop(self, tokens_to_remove: int) -> None:
        """As ``DynamicLayer.crop``, in place: only the held length shrinks."""
        self._adopt_replaced()
        super().crop(tokens_to_remove)
        if self.buf is not None and not self._fallback and self.keys is not None:
            self.n = min(self.n, int(self.keys.shape[-2]))
            self._publish()

    def reset(self) -> None:
        self.buf = None
        self.n = 0
        self._fallback = False
        self._plain = False
        # dropped, not zeroed, whatever the transformers version does (5.17's DynamicLayer.reset
        # zeroes them in place, which would keep a stale length)
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()
        self._pub = (None, None)

    def __repr__(self) -> str:
        return f"InPlaceLayer(n={self.n}, capacity={self.capacity})"
