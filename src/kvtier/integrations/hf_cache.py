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

from kvtier.engine import ChunkViews
from kvtier.gpu.transfer import side_stream

log = logging.getLogger(__name__)


class IntegrationError(ValueError):
    """A model, cache or input the transformers integration cannot work with (names the problem)."""


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
    if getattr(cfg, "use_mla", False) or getattr(cfg, "kv_lora_rank", None):
        raise IntegrationError(
            f"{cfg.model_type}: MLA caches are not supported by the transformers integration"
        )


def cache_to_kv(cache: Any, num_tokens: int, *, batch_index: int = 0) -> torch.Tensor:
    """The first ``num_tokens`` positions of ``cache`` as ``[L, 2, T, H, D]`` (a new contiguous tensor)."""
    layers = cache.layers
    first = layers[0].keys
    n_layers = len(layers)
    _, heads, seq, dim = first.shape
    if seq < num_tokens:
        raise IntegrationError(f"the cache holds {seq} positions, fewer than the {num_tokens} to store")
    out = torch.empty((n_layers, 2, num_tokens, heads, dim), dtype=first.dtype, device=first.device)
    for i, layer in enumerate(layers):
        if layer.keys.shape[-2] < num_tokens:
            raise IntegrationError(
                f"layer {i} holds {layer.keys.shape[-2]} positions, expected >= {num_tokens}"
            )
        out[i, 0].copy_(layer.keys[batch_index, :, :num_tokens].transpose(0, 1))
        out[i, 1].copy_(layer.values[batch_index, :, :num_tokens].transpose(0, 1))
    return out


class LayerwiseKV:
    """Hands out one layer's cached prefix at a time, as ``[B, H, n, D]`` keys and values.

    ``rows`` holds one ``[L, 2, n, H, D]`` tensor per batch row (same ``n``). If a row already
    lives on ``device`` its layers are views. If it is on the host and ``device`` is CUDA,
    ``prefetch(i)`` enqueues layer ``i``'s copy on a side stream and records an event;
    ``take(i)`` makes the compute stream wait for that event only, so later layers keep copying
    while earlier ones compute.
    """

    def __init__(self, rows: list[torch.Tensor], device: torch.device) -> None:
        if not rows or any(r.dim() != 5 or r.shape != rows[0].shape for r in rows):
            raise IntegrationError("LayerwiseKV needs one [L, 2, n, H, D] tensor per row, all of one shape")
        self.rows = rows
        self.num_layers = int(rows[0].shape[0])
        self.num_tokens = int(rows[0].shape[2])
        self.device = device
        self._async = device.type == "cuda" and rows[0].device.type == "cpu"
        self._stream = side_stream(device) if self._async else None
        self._staged: dict[int, tuple[list[torch.Tensor], Any]] = {}

    def prefetch(self, layer: int) -> None:
        if not self._async or layer >= self.num_layers or layer in self._staged:
            return
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dev = [r[layer].to(self.device, non_blocking=True) for r in self.rows]
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._staged[layer] = (dev, ev)

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (keys, values), usable by work enqueued next on the current stream."""
        if self._async:
            self.prefetch(layer)
            srcs, ev = self._staged.pop(layer)
            main = torch.cuda.current_stream(self.device)
            main.wait_event(ev)
            for t in srcs:
                t.record_stream(main)
        else:
            srcs = [r[layer] for r in self.rows]
        # [2, n, H, D] -> [1, H, n, D] views; DynamicLayer.update's cat makes them contiguous.
        ks = [s[0].transpose(0, 1).unsqueeze(0) for s in srcs]
        vs = [s[1].transpose(0, 1).unsqueeze(0) for s in srcs]
        if len(srcs) == 1:
            return ks[0], vs[0]
        return torch.cat(ks), torch.cat(vs)

    def close(self) -> None:
        """Called once every layer has been taken; views over tier memory are given back here."""


class ChunkedLayerwiseKV(LayerwiseKV):
    """A ``LayerwiseKV`` over the CPU tier's pinned chunk views (``CacheEngine.retrieve_chunks``).

    Layers are copied in groups of ``group_layers`` straight from the pool to the GPU on the
    side stream: nothing is assembled on the host, and group g+1 loads while group g computes.
    Why groups, not single layers: a chunk's layers ``[l0:l1]`` are one contiguous block of the
    pool, so a group costs one async memcpy per chunk; per-layer copies would be 8x more calls
    and their launch cost (~10 µs each from Python) lands on the thread that drives the forward.
    ``close`` waits for the copies and releases the views (their pins keep the pool from
    reusing the memory meanwhile).
    """

    def __init__(self, views: list[ChunkViews], num_tokens: int, device: torch.device,
                 group_layers: int = 0) -> None:  # fmt: skip
        if device.type != "cuda" or not views or any(not v.chunks for v in views):
            raise IntegrationError("ChunkedLayerwiseKV needs CUDA and a non-empty chunk list per row")
        first = views[0].chunks[0][1].kv
        self.views = views
        self.num_layers = int(first.shape[0])
        self.num_tokens = num_tokens
        self.device = device
        self.group_layers = group_layers or max(1, -(-self.num_layers // 4))
        self._async = True
        self._stream = side_stream(device)
        self._groups: dict[int, tuple[list[torch.Tensor], Any]] = {}

    def _stage_group(self, g: int) -> None:
        l0 = g * self.group_layers
        if l0 >= self.num_layers or g in self._groups:
            return
        l1 = min(l0 + self.group_layers, self.num_layers)
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            dsts = []
            for v in self.views:
                first = v.chunks[0][1].kv
                ct = int(first.shape[2])
                shape = (
                    len(v.chunks),
                    l1 - l0,
                    int(first.shape[1]),
                    ct,
                    int(first.shape[3]),
                    int(first.shape[4]),
                )
                dst = torch.empty(shape, dtype=first.dtype, device=self.device)
                for c, (_, chunk) in enumerate(v.chunks):
                    n = int(chunk.kv.shape[2])
                    target = dst[c] if n == ct else dst[c, :, :, :n]
                    target.copy_(chunk.kv[l0:l1], non_blocking=True)
                dsts.append(dst)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._groups[g] = (dsts, ev)

    def prefetch(self, layer: int) -> None:
        g = layer // self.group_layers
        self._stage_group(g)
        self._stage_group(g + 1)  # keep one group in flight ahead of the forward

    def take(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, j = divmod(layer, self.group_layers)
        self._stage_group(g)
        dsts, ev = self._groups[g]
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ev)
        ks, vs = [], []
        for dst in dsts:
            dst.record_stream(main)
            t = dst[:, j]  # [chunks, planes, ct, H, D]
            flat = t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[3], t.shape[4])[:, : self.num_tokens]
            ks.append(flat[0].transpose(0, 1).unsqueeze(0))
            vs.append(flat[-1].transpose(0, 1).unsqueeze(0))
        if j == min(self.group_layers, self.num_layers - g * self.group_layers) - 1:
            del self._groups[g]  # the group's last layer: its buffers go when the forward is done
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks), torch.cat(vs)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        for v in self.views:
            v.release()
        self.views = []


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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
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
