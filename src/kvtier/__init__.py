"""kvtier: a tiered KV-cache layer for LLM inference.

from kvtier import CacheEngine, Config
engine = CacheEngine(Config.load())
engine.store(tokens, kv)          # kv: [num_layers, 2, len(tokens), num_kv_heads, head_dim]
r = engine.retrieve(tokens)       # r.num_tokens, r.kv

The public names are imported on first use (PEP 562 ``__getattr__``), so ``import kvtier`` and
``kvtier --help`` do not pay for torch; ``__version__`` comes from the installed metadata.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("kvtier")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "CacheEngine": "kvtier.engine",
    "KVError": "kvtier.engine",
    "RetrieveResult": "kvtier.engine",
    "CacheStats": "kvtier.observability",
    "ChunkKey": "kvtier.keys",
    "Namespace": "kvtier.keys",
    "Config": "kvtier.config",
    "ConfigError": "kvtier.config",
    "KVTierError": "kvtier.errors",
}

if TYPE_CHECKING:
    from kvtier.config import Config, ConfigError
    from kvtier.engine import CacheEngine, KVError, RetrieveResult
    from kvtier.errors import KVTierError
    from kvtier.keys import ChunkKey, Namespace
    from kvtier.observability import CacheStats


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CacheEngine",
    "CacheStats",
    "ChunkKey",
    "Config",
    "ConfigError",
    "KVError",
    "KVTierError",
    "Namespace",
    "RetrieveResult",
    "__version__",
]
