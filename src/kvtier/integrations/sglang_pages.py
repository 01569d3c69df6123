"""SGLang HiCache host-pool pages as kvtier chunk views (no copies).

SGLang's host KV pool keeps a page of ``page_size`` tokens in one of several layouts; kvtier
stores every chunk as ``[layers, planes, tokens, heads, head_dim]`` (MLA: planes 1, heads 1,
head_dim = latent + rope). ``PageLayout.view`` turns a page of the pool (or a flat page
SGLang hands a backend) into that shape by reshape/permute only; ``gather`` (store) and
``scatter`` (load) are the one copy each way, iterated in the order the memory lies.

Invariants:
* Pages are stored in kvtier's layout, not the pool's, so a layer-first writer and a
  page-first reader (another SGLang process) share pages bit-exactly.
* Only the pool classes and layouts listed in ``_LAYOUTS`` are accepted; anything else
  (``page_unified``, MLA kv-split, asymmetric K/V widths, DCP shards, non-float dtypes) raises
  ``SGLangLayoutError`` at registration with the one-line reason, instead of storing pages
  a reader would scramble.

Imports nothing from SGLang: the pool is described by its attributes, so this module is
testable without it; ``sglang.py`` holds the SGLang-facing class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import KVTierError


class SGLangLayoutError(KVTierError, ValueError):
    """The SGLang host pool's class, layout or geometry is not one kvtier can store."""


# (pool kind, layout) -> (page shape pattern, axis to drop, permutation to [L, planes, T, H, D]).
# Pattern letters: P planes (2), L layers, T page tokens, H heads, D head dim, 1 a unit axis.
_LAYOUTS: dict[tuple[str, str], tuple[str, int | None, tuple[int, ...]]] = {
    ("mha", "layer_first"): ("PLTHD", None, (1, 0, 2, 3, 4)),
    ("mha", "page_first"): ("PTLHD", None, (2, 0, 1, 3, 4)),
    ("mha", "page_first_direct"): ("P1LTHD", 1, (1, 0, 2, 3, 4)),
    ("mha", "page_head"): ("P1HTLD", 1, (3, 0, 2, 1, 4)),
    # MLA pages have no plane axis; "1" is the pool's unit head axis (kept as H = 1).
    ("mla", "layer_first"): ("LTHD", None, (0, 1, 2, 3)),
    ("mla", "page_first"): ("TLHD", None, (1, 0, 2, 3)),
    ("mla", "page_first_direct"): ("1LTHD", 0, (0, 1, 2, 3)),
}


@dataclass(frozen=True)
class PageLayout:
    """How one SGLang host pool lays out a page, and its kvtier geometry."""

    kind: str  # "mha" or "mla"
    layout: str
    layers: int
    heads: int
    head_dim: int
    page_tokens: int
    dtype: torch.dtype

    @property
    def planes(self) -> int:
        return 1 if self.kind == "mla" else 2

    @property
    def page_shape(self) -> tuple[int, ...]:
        """The pool's own shape of one page (``get_data_page(flat=False)``)."""
        sizes = {"P": 2, "L": self.layers, "T": self.page_tokens, "H": self.heads, "D": self.head_dim, "1": 1}
        return tuple(sizes[c] for c in _LAYOUTS[(self.kind, self.layout)][0])

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, self.planes, self.page_tokens, self.heads, self.head_dim)

    def native(self, page: torch.Tensor) -> torch.Tensor:
        """``page`` (pool-shaped or flat) in the pool's own page shape."""
        t = page.view(self.page_shape) if page.dim() == 1 else page
        if tuple(t.shape) != self.page_shape:
            raise SGLangLayoutError(f"page has shape {tuple(page.shape)}, expected {self.page_shape} or flat")
        return t

    def gather(self, page: torch.Tensor) -> torch.Tensor:
        """A contiguous ``chunk_shape`` copy of a pool page (what a store hands the engine)."""
        out = torch.empty(self.chunk_shape, dtype=self.dtype, device=page.device)
        _bits(out).copy_(_bits(self.view(page)))
        return out

    def scatter(self, kv: torch.Tensor, page: torch.Tensor) -> None:
        """Copy a ``chunk_shape`` tensor into a pool page (pool-shaped or flat view of the pool)."""
        dst = self.native(page)
        _bits(dst).copy_(_bits(self._to_native(kv)))

    def _to_native(self, kv: torch.Tensor) -> torch.Tensor:
        _, drop, perm = _LAYOUTS[(self.kind, self.layout)]
        t = kv.squeeze(1) if self.kind == "mla" else kv
        inv = [perm.index(i) for i in range(len(perm))]
        t = t.permute(*inv)
        return t.unsqueeze(drop) if drop is not None else t

    def view(self, page: torch.Tensor) -> torch.Tensor:
        """``page`` (pool-shaped or flat, as SGLang hands it) as a ``chunk_shape`` view."""
        _, drop, perm = _LAYOUTS[(self.kind, self.layout)]
        t = self.native(page)
        if drop is not None:
            t = t.squeeze(drop)
        t = t.permute(*perm)
        return t.unsqueeze(1) if self.kind == "mla" else t


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as integers of its width. NOTE: torch copies strided bf16/fp16 through a
    float conversion loop, ~20x slower than the same bytes as int16; the copy stays bit-exact."""
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def describe_pool(pool: Any) -> PageLayout:
    """The ``PageLayout`` of an SGLang host pool, or ``SGLangLayoutError`` naming what is unsupported.

    Recognised by class name (``MHATokenToKVPoolHost``, ``MLATokenToKVPoolHost``): their
    subclasses store other byte formats (FP8 scales, K-only, asymmetric widths) and are refused.
    """
    cls = type(pool).__name__
    layout = str(getattr(pool, "layout", ""))
    kind = {"MHATokenToKVPoolHost": "mha", "MLATokenToKVPoolHost": "mla"}.get(cls)
    if kind is None:
        raise SGLangLayoutError(
            f"kvtier stores MHATokenToKVPoolHost and MLATokenToKVPoolHost pages, not {cls}; "
            "use another HiCache storage backend for this model"
        )
    if (kind, layout) not in _LAYOUTS:
        ok = sorted(lay for k, lay in _LAYOUTS if k == kind)
        raise SGLangLayoutError(
            f"kvtier cannot store {cls} pages in layout {layout!r}; start SGLang with "
            f"--hicache-mem-layout one of {ok}"
        )
    if getattr(pool, "dcp_size", 1) != 1:
        raise SGLangLayoutError("kvtier does not store decode-context-parallel (dcp_size > 1) page shards")
    dtype = pool.dtype
    if not dtype.is_floating_point:
        raise SGLangLayoutError(f"kvtier stores floating-point KV, the pool holds {dtype} (packed FP8?)")
    if kind == "mha":
        if pool.v_head_dim != pool.head_dim:
            raise SGLangLayoutError(
                f"kvtier needs equal K and V head dims, the pool has {pool.head_dim} and {pool.v_head_dim}"
            )
        heads, dim = pool.head_num, pool.head_dim
    else:
        heads, dim = 1, pool.kv_cache_dim
    return PageLayout(kind, layout, pool.layer_num, heads, dim, pool.page_size, dtype)
