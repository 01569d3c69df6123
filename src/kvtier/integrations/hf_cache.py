"""The transformers side of kvtier: layout translation, namespaces and a layer-wise loading Cache.

Layouts: kvtier's CacheEngine speaks ``[num_layers, 2, T, num_kv_heads, head_dim]``; a
transformers cache holds, per layer, ``keys``/``values`` of ``[batch, num_kv_heads, T, head_dim]``
(keys after RoPE). Positions are absolute and RoPE is applied before the cache, so the KV of a
prefix is valid for any continuation of it: that is what makes prefix reuse exact.

``KVTierCache`` is a ``DynamicCache`` whose first ``num_tokens`` positions come from kvtier.
Every attention layer calls ``update(k, v, layer_idx)`` in order during the forward; the cache
installs layer ``i``'s cached prefix only then (waiting for its transfer) and starts layer
``i+1``'s, so on CUDA the copy of the next layer overlaps the compute of this one. Until a layer
is installed, ``get_seq_length``/``get_mask_sizes`` report the pending prefix, so positions and
masks are right from the first layer on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from kvtier.errors import KVTierError
from kvtier.transfer.layerwise import ChunkedLayerwiseKV, LayerwiseKV, cache_to_kv

__all__ = [
    "ChunkedLayerwiseKV",
    "IntegrationError",
    "KVTierCache",
    "LayerwiseKV",
    "ModelKVSpec",
    "UnsupportedInputError",
    "cache_to_kv",
    "check_supported",
    "model_kv_spec",
]

log = logging.getLogger(__name__)


class IntegrationError(KVTierError, ValueError):
    """A model, cache or input the transformers integration cannot work with (names the problem)."""


class UnsupportedInputError(KVTierError, NotImplementedError):
    """A valid input the integration does not support yet (padded batches)."""


@dataclass(frozen=True)
class ModelKVSpec:
    """What decides whether KV is valid for a model: folded into the engine's namespace."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def model_kv_spec(model: Any, model_id: str | None = None) -> ModelKVSpec:
    """The KV geometry of a transformers causal LM, from its config and parameters.

    ``model_id`` defaults to ``config._name_or_path``; a digest of a few weight values is
    appended, so two checkpoints saved under the same name (a fine-tune, a re-init) never share
    KV. The digest reads a fixed handful of elements: cheap, and stable across processes.
    """
    cfg = model.config.get_text_config(decoder=True)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    name = model_id or getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    if not name:
        name = f"{cfg.model_type}-unnamed"
    dtype = next(model.parameters()).dtype
    return ModelKVSpec(f"{name}#{weights_digest(model)}", layers, kv_heads, head_dim, dtype)


def weights_digest(model: Any, sample: int = 64) -> str:
    """A short digest of the first ``sample`` values of the first, middle and last parameter."""
    params = [p for p in model.parameters() if p.numel() > 0]
    h = hashlib.blake2b(digest_size=6)
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().reshape(-1)[:sample].float().cpu()
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


def check_supported(model: Any) -> None:
    """Refuse models whose cache is not a plain full-attention KV per layer (clear error, never wrong KV)."""
    cfg = model.config.get_text_config(decoder=True)
    layer_types = getattr(cfg, "layer_types", None) or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise IntegrationError(
            f"{cfg.model_type}: layer types {other} are not supported yet (kvtier reuses full-attention "
            "KV only; sliding-window and linear-attention layers do not keep every position)"
        )
    if not layer_types:  # then transformers makes every layer of a windowed config a sliding one
        _check_no_window(cfg)
    if getattr(cfg, "use_mla", False) or getattr(cfg, "kv_lora_rank", None):
        raise IntegrationError(
            f"{cfg.model_type}: MLA caches are not supported by the transformers integration"
        )


def _check_no_window(cfg: Any) -> None:
    """Refuse a config that windows every layer (``sliding_window`` / ``attention_chunk_size``
    without ``layer_types``: Mistral v0.1, Phi3, Starcoder2 style), unless the window is at least
    ``max_position_embeddings`` (then no prompt reaches it: full attention).

    Why refuse rather than cap: such a cache keeps only the last ``window - 1`` positions, so
    after a generation that crosses the window its first positions are gone and what kvtier
    would store as positions 0.. is KV of later ones (issue 22 #4), and a prefix longer than the
    window cannot be rebuilt into it. The check runs before any lookup or store.
    """
    for attr in ("sliding_window", "attention_chunk_size"):
        window = getattr(cfg, attr, None)
        limit = getattr(cfg, "max_position_embeddings", None)
        if window is None or (limit is not None and int(window) >= int(limit)):
            continue
        raise IntegrationError(
            f"{cfg.model_type}: {attr}={window}: every layer attends to (and its cache keeps) only the "
            f"last {window} positions, which kvtier's transformers integration does not support yet "
            f"(it reuses full-attention KV only). Use a checkpoint without a window (e.g. Mistral-7B "
            f"v0.2+), or if prompt plus generation always stay under {window} tokens set "
            f"config.{attr}=None (then every layer is full attention, which is then exact)"
        )


class KVTierCache(DynamicCache):
    """A DynamicCache pre-filled, layer by layer as the forward reaches it, from a ``LayerwiseKV``."""

    def __init__(self, config: Any, prefix: LayerwiseKV | None = None) -> None:
        super().__init__(config=config)
        self._prefix = prefix
        self.prefix_tokens = prefix.num_tokens if prefix is not None else 0
        """Positions that came from kvtier (installed or still pending)."""
        self._pending: set[int] = set(range(prefix.num_layers)) if prefix is not None else set()
        if prefix is not None:
            if prefix.num_layers != len(self.layers):
                raise IntegrationError(
                    f"cached KV has {prefix.num_layers} layers but the model's cache has {len(self.layers)}"
                )
            prefix.prefetch(0)
            prefix.prefetch(1)

    def _install(self, layer_idx: int) -> None:
        if layer_idx not in self._pending:
            return
        assert self._prefix is not None
        self._prefix.prefetch(layer_idx + 1)  # next layer's copy overlaps this layer's compute
        k, v = self._prefix.take(layer_idx)
        self._pending.discard(layer_idx)
        layer: Any = self.layers[layer_idx]  # a DynamicLayer: check_supported refused other kinds
        layer.update(k, v)
        if not self._pending:
            self._prefix.close()
            self._prefix = None  # drop the retrieved tensor: the layers now hold their own copies

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._install(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx in self._pending:
            return self.prefix_tokens
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx in self._pending:
            return self.prefix_tokens + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def finish_loading(self) -> None:
        """Install every layer not reached by a forward yet (before reading ``layers`` directly)."""
        for i in sorted(self._pending):
            self._install(i)
