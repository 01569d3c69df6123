"""The transformers side of kvtier: layout translation, namespaces and a layer-wise loading Cache.

Layouts: kvtier's CacheEngine speaks ``[num_layers, 2, T, num_kv_heads, head_dim]``; a
transformers cache holds, per layer, ``keys``/``values`` of ``[batch, num_kv_heads, T, head_dim]``
(keys after RoPE); MLA models (DeepSeek-V2/V3) cache a latent instead, keys ``[batch, 1, T, rank]``
and values ``[batch, 1, T, rope]``, which kvtier stores as one plane ``[L, 1, T, 1, rank + rope]``
(``ModelKVSpec.latent_split``). Positions are absolute and RoPE is applied before the cache, so the KV of a
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
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvtier.errors import KVTierError
from kvtier.integrations.hf_layers import InPlaceLayer
from kvtier.transfer.layerwise import ChunkedLayerwiseKV, LayerwiseKV, cache_to_kv

__all__ = [
    "ChunkedLayerwiseKV",
    "InPlaceLayer",
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
    """What decides whether KV is valid for a model: folded into the engine's namespace.

    ``planes`` is 2 (keys, values) for attention models; MLA models (DeepSeek-V2/V3) cache one
    latent per position (``num_kv_heads`` 1, ``head_dim`` = latent width): transformers keeps
    it as keys ``[B, 1, T, latent_split]`` (the normalised ``kv_nope``) and values
    ``[B, 1, T, head_dim - latent_split]`` (the RoPE'd ``k_rot``), kvtier as one row, the same
    ``[kv_c, k_pe]`` latent vLLM's MLA cache holds.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    planes: int = 2
    latent_split: int | None = None


_ATTENTION = ("full_attention", "sliding_attention")
"""Layer types whose cache is per-position K/V that kvtier can store and rebuild."""
_MLA_MODELS = ("deepseek_v2", "deepseek_v3")
"""Models whose MLA latent cache layout (keys = ``kv_nope``, values = ``k_rot``) is tested."""
_STATE_ATTRS = ("ssm_state_size", "mamba_d_state", "state_size", "mamba_d_conv", "conv_kernel")
"""Config fields of Mamba/SSM models (for versions whose configs have no ``layer_types``)."""


def model_kv_spec(model: Any, model_id: str | None = None) -> ModelKVSpec:
    """The KV geometry of a transformers causal LM, from its config and parameters.

    ``model_id`` defaults to ``config._name_or_path``; a digest of a few weight values is
    appended, so two checkpoints saved under the same name (a fine-tune, a re-init) never share
    KV. The digest reads a fixed handful of elements: cheap, and stable across processes. A model
    with local (sliding-window) layers also gets its attention pattern appended
    (``attention_signature``): the same weights under another window compute other KV.
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
    full_id = f"{name}#{weights_digest(model)}{attention_signature(model)}"
    rank = getattr(cfg, "kv_lora_rank", None)
    if rank:  # MLA: one latent row per position (check_supported admits only _MLA_MODELS)
        latent = int(rank) + int(cfg.qk_rope_head_dim)
        return ModelKVSpec(full_id, layers, 1, latent, dtype, planes=1, latent_split=int(rank))
    return ModelKVSpec(full_id, layers, kv_heads, head_dim, dtype)


def weights_digest(model: Any, sample: int = 64) -> str:
    """A short digest of the first ``sample`` values of the first, middle and last parameter."""
    params = [p for p in model.parameters() if p.numel() > 0]
    h = hashlib.blake2b(digest_size=6)
    for p in (params[0], params[len(params) // 2], params[-1]):
        flat = p.detach().reshape(-1)[:sample].float().cpu()
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


def attention_signature(model: Any) -> str:
    """``""`` for a model whose layers are all full attention (its keys stay as before), else
    ``~swa`` + a digest of each layer's window (``None`` for a global layer): Mistral
    ``sliding_window``, Gemma ``layer_types``, Qwen2 ``use_sliding_window``, per-layer configs.
    Read from the layers of the cache transformers itself would build for this config."""
    windows = [getattr(layer, "sliding_window", None) for layer in _cache_layers(model)]
    if all(w is None for w in windows):
        return ""
    return "~swa" + hashlib.blake2b(repr(windows).encode(), digest_size=4).hexdigest()


def _cache_layers(model: Any) -> list[Any]:
    """The layers of the ``DynamicCache`` transformers builds for the model (no tensors yet)."""
    return list(DynamicCache(config=model.config).layers)


def _layer_types(cfg: Any) -> list[str]:
    """The config's layer types (``layer_types``, or the older ``layers_block_type``), else
    inferred as transformers does: a window or a chunk size on a config without types makes
    every layer local; Mamba/SSM fields make every layer a state layer."""
    for attr in ("layer_types", "layers_block_type"):
        types = getattr(cfg, attr, None)
        if types:
            return [str(t) for t in types]
    n = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    if any(getattr(cfg, a, None) is not None for a in _STATE_ATTRS):
        return ["mamba"] * n
    if getattr(cfg, "sliding_window", None) is not None:
        return ["sliding_attention"] * n
    if getattr(cfg, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def _why_not(layer_type: str) -> str:
    if layer_type in ("mamba", "linear_attention", "conv", "hybrid", "hybrid_sliding", "recurrent"):
        return (
            "Mamba/SSM, linear-attention and convolution layers keep a recurrent state, not per-position "
            "KV, so a cached prefix cannot be rebuilt from KV chunks"
        )
    if layer_type == "chunked_attention":
        return "chunked local attention (Llama-4 style) is not supported yet"
    return "kvtier stores per-position K/V of full and sliding-window attention layers only"


def check_supported(model: Any) -> None:
    """Refuse models whose cache is not per-position K/V that kvtier can rebuild (a clear error
    naming the layer type, raised before any lookup or store: never wrong KV).

    Supported: full attention, sliding-window layers (all or interleaved; ``KVTierCache`` keeps
    their full KV, the mask applies the window) and the MLA latent of ``_MLA_MODELS``. Refused:
    Mamba/SSM/linear-attention/conv state layers, chunked local attention, KV-sharing (dummy)
    and other special cache layers, other MLA variants.
    """
    cfg = model.config.get_text_config(decoder=True)
    types = _layer_types(cfg)
    other = sorted({t for t in types if t not in _ATTENTION})
    if other:
        raise IntegrationError(
            f"{cfg.model_type}: layer types {other} are not supported by kvtier's transformers "
            f"integration ({_why_not(other[0])}); supported: {list(_ATTENTION)} layers"
        )
    kinds = sorted({type(x).__name__ for x in _cache_layers(model) if type(x) not in _LAYER_CLASSES})
    if kinds:
        raise IntegrationError(
            f"{cfg.model_type}: its cache has {kinds} layers, which kvtier's transformers integration does "
            "not support (it stores per-position K/V of DynamicLayer and DynamicSlidingWindowLayer only)"
        )
    if getattr(cfg, "kv_lora_rank", None) and cfg.model_type not in _MLA_MODELS:
        raise IntegrationError(
            f"{cfg.model_type}: MLA caches of this model are not supported by the transformers integration "
            f"(supported: {list(_MLA_MODELS)})"
        )
    if getattr(cfg, "use_mla", False) and not getattr(cfg, "kv_lora_rank", None):
        raise IntegrationError(f"{cfg.model_type}: use_mla without kv_lora_rank is not supported")


_LAYER_CLASSES = (DynamicLayer, DynamicSlidingWindowLayer)


class KVTierCache(DynamicCache):
    """A DynamicCache pre-filled, layer by layer as the forward reaches it, from a ``LayerwiseKV``.

    Every layer keeps the KV of every position, sliding-window layers included (a plain
    ``DynamicCache`` keeps only their last ``window - 1``): the model's sliding mask, built from
    absolute positions, still restricts what they attend to, so the output is the same, and any
    prefix of the prompt or of the generation can be stored. Why not keep just the window:
    kvtier's chunks hold one row per layer and position, and a prefix longer than the window
    could not be stored after the first positions were dropped. Cost: sliding layers hold (and
    attend over, masked) the whole sequence, like global ones.

    Layers are ``InPlaceLayer``s (``in_place``, the default): each holds one buffer for
    ``capacity`` positions (prompt + tokens to generate; it grows if exceeded), the prefix is
    copied straight from the source into it (``LayerwiseKV.fill``: one copy per layer, no
    ``cat``), and every later update writes in place. ``in_place=False`` keeps plain
    ``DynamicLayer``s (``cat`` per update), for callers that hand the layers tensors themselves.
    """

    def __init__(
        self, config: Any, prefix: LayerwiseKV | None = None, capacity: int = 0, in_place: bool = True
    ) -> None:
        super().__init__(config=config)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _LAYER_CLASSES):
                if not in_place:
                    self.layers[i] = DynamicLayer()
                    continue
                lay = InPlaceLayer(capacity)
                lay.defer = prefix is None  # nothing to load: the prompt's own tensors until decoding
                self.layers[i] = lay
        self.capacity = int(capacity)
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

    def _install(self, layer_idx: int, batch: int = 0) -> None:
        """Load layer ``layer_idx``'s prefix; ``batch`` (the forward's rows), a multiple of the
        source's rows, repeats each row (``generate`` expands the prompt for beams / return
        sequences, ``repeat_interleave`` order, but not a cache handed to it)."""
        if layer_idx not in self._pending:
            return
        src = self._prefix
        assert src is not None
        src.prefetch(layer_idx + 1)  # next layer's copy overlaps this layer's compute
        self._pending.discard(layer_idx)
        layer: Any = self.layers[layer_idx]  # check_supported refused other kinds
        rep = batch // src.batch if batch > src.batch and batch % src.batch == 0 else 1
        if isinstance(layer, InPlaceLayer):
            planes, split = (1, src.latent_split) if src.latent_split is not None else (src.planes, None)
            n = src.num_tokens
            dst = layer.reserve(
                src.batch * rep, planes, src.heads, src.width, split, src.dtype, src.device, n
            )
            src.fill(layer_idx, dst[:, ::rep])
            for r in range(1, rep):
                dst[:, r::rep, :n].copy_(dst[:, ::rep, :n])
            layer.filled(n)
        else:
            k, v = src.take(layer_idx)
            if rep > 1:
                k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
            layer.update(k, v)
        if not self._pending:
            src.close()
            self._prefix = None  # drop the retrieved tensor: the layers now hold their own copies

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._install(layer_idx, int(key_states.shape[0]))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx in self._pending:
            return self.prefix_tokens
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx in self._pending:
            return self.prefix_tokens + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Beams / ``num_return_sequences``: install pending layers first (a pending layer reports no
        positions, so transformers would leave it unexpanded and its prefix would keep batch 1)."""
        self.finish_loading()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.finish_loading()
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.finish_loading()
        super().reorder_cache(beam_idx)

    def finish_loading(self) -> None:
        """Install every layer not reached by a forward yet (before reading ``layers`` directly)."""
        for i in sorted(self._pending):
            self._install(i)
