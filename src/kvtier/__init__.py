"""kvtier: a tiered KV-cache layer for LLM inference.

from kvtier import CacheEngine, Config
engine = CacheEngine(Config.load())
engine.store(tokens, kv)          # kv: [num_layers, 2, len(tokens), num_kv_heads, head_dim]
r = engine.retrieve(tokens)       # r.num_tokens, r.kv
"""

from kvtier.config import Config, ConfigError
from kvtier.engine import CacheEngine, KVError, RetrieveResult
from kvtier.keys import ChunkKey, Namespace
from kvtier.observability import CacheStats

__version__ = "0.1.0"

__all__ = [
    "CacheEngine",
    "CacheStats",
    "ChunkKey",
    "Config",
    "ConfigError",
    "KVError",
    "Namespace",
    "RetrieveResult",
    "__version__",
]
