"""Paged-cache entry points of the CacheEngine (filled in by the GPU data-path work)."""

from __future__ import annotations


class PagedMixin:
    """Methods of CacheEngine that move KV between paged engine caches and kvtier chunks."""
