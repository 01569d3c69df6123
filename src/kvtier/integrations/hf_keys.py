"""What of a transformers call besides ``input_ids`` changes the KV: the integration's key inputs.

Rules and why:
* **Weights and adapters**: the namespace's weights digest is taken once per model; a model
  changed afterwards (a LoRA merged in place, an adapter loaded, switched or disabled) computes
  other KV for the same tokens. ``adapter_identity`` samples *every* parameter (LoRA weights
  are parameters) and reads PEFT's per-layer adapter state, memoised on the parameters'
  storage and version counters, so it costs a few attribute reads per call.
* **Other model inputs** (``pixel_values``, ``image_grid_thw``, ``input_features``,
  ``token_type_ids``...: every ``generate`` keyword that is not a generation setting): their
  digest is folded into every chunk's key, and only the tokens *before the first multimodal
  placeholder* are cached. Why not more: a hit that covered a placeholder would leave the
  suffix without the placeholder tokens the model needs to place the image's features, and
  some models (prefix-LM, M-RoPE) derive positions of later text from the image. An input that
  cannot be hashed, or tensors with no known placeholder token, make the call uncacheable: a
  plain ``generate``, counted in ``CacheStats.uncacheable_requests``.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.errors import KVTierError

_PLACEHOLDER_ATTRS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "audio_token_id",
    "audio_token_index",
)
_PRIMITIVE = (bool, int, float, str, bytes, type(None))


class Uncacheable(KVTierError):
    """Raised by ``input_extras`` with the name of the input kvtier cannot key."""


@dataclass(frozen=True)
class InputKeys:
    """``digest`` of the extra model inputs ("" = none); ``limit``: how many leading tokens of
    each row may be cached (the first placeholder; ``None`` = all)."""

    digest: str = ""
    limit: int | None = None


def generation_keys(model: Any) -> set[str]:
    """Keyword names ``generate`` consumes itself (generation settings, not model inputs)."""
    from transformers import GenerationConfig

    names = set(GenerationConfig().to_dict()) | set(inspect.signature(model.generate).parameters)
    return names | {"attention_mask", "use_cache", "generation_config", "cache_implementation"}


def input_extras(model: Any, rows: torch.Tensor, kwargs: dict[str, Any]) -> InputKeys:
    """The ``InputKeys`` of the model inputs among ``kwargs``; raises ``Uncacheable``."""
    if not kwargs:  # NOTE: the common case; generation_keys costs ~1 ms (a signature, a config)
        return InputKeys()
    gen = generation_keys(model)
    inputs = {k: v for k, v in kwargs.items() if k not in gen}
    if not inputs:
        return InputKeys()
    h = hashlib.blake2b(b"kvtier-hf-inputs-v1", digest_size=16)
    has_tensor = False
    for name in sorted(inputs):
        h.update(name.encode() + b"\0")
        has_tensor = _update(h, inputs[name], name) or has_tensor
    limit = None
    if has_tensor:
        ids = placeholder_ids(model)
        if not ids:
            raise Uncacheable(f"model inputs {sorted(inputs)} with no known placeholder token in the config")
        mask = torch.isin(rows, torch.tensor(sorted(ids), dtype=rows.dtype))
        firsts = [int(r.nonzero()[0]) if bool(r.any()) else int(rows.shape[1]) for r in mask]
        limit = min(firsts)
    return InputKeys(h.hexdigest(), limit)


def _update(h: Any, value: Any, name: str) -> bool:
    """Feed ``value`` into ``h``; True if it held a tensor. Raises ``Uncacheable`` for other objects."""
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return True
    if isinstance(value, _PRIMITIVE):
        h.update(f"P{type(value).__name__}:{value!r}".encode())
        return False
    if isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        return any([_update(h, v, name) for v in value])
    if isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        return any(
            [_update(h, (str(k), v), name) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
        )
    raise Uncacheable(f"model input {name!r} of type {type(value).__name__} cannot be hashed")


def placeholder_ids(model: Any) -> set[int]:
    """Multimodal placeholder token ids named in the model's config (top level or sub-configs)."""
    out: set[int] = set()
    cfgs = [model.config] + [getattr(model.config, a, None) for a in ("text_config", "vision_config")]
    for cfg in cfgs:
        for a in _PLACEHOLDER_ATTRS:
            v = getattr(cfg, a, None) if cfg is not None else None
            if isinstance(v, int):
                out.add(v)
    return out


def adapter_identity(model: Any) -> str:
    """A digest of every parameter (sampled) and of PEFT's adapter state; "" never (always keyed)."""
    # NOTE: one walk over the modules (this runs before every lookup: ~5 ms for 32 layers as
    # ``parameters()`` + ``modules()`` + a failing ``nn.Module.__getattr__`` per module). The
    # parameter order is ``parameters()``'s (modules in order, shared ones once), so digests match.
    params: list[Any] = []
    seen: set[int] = set()
    tuners: list[Any] = []
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        # a bool ``disable_adapters`` is a class attribute/property (PEFT) or an instance one;
        # nn.Module.__getattr__ (parameters, buffers, submodules) never returns a bool
        if "disable_adapters" in m.__dict__ or hasattr(type(m), "disable_adapters"):
            tuners.append(m)
    state: list[Any] = [(p.data_ptr(), p._version, tuple(p.shape)) for p in params]
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers' PEFT integration
        state.append(("active", tuple(_names(model.active_adapters))))
    for m in tuners:  # PEFT tuner layers: which adapters are on, off or merged
        flag = getattr(m, "disable_adapters", None)
        if isinstance(flag, bool) and hasattr(m, "active_adapters"):
            state.append(
                (flag, tuple(_names(m.active_adapters)), tuple(_names(getattr(m, "merged_adapters", ()))))
            )
    key = tuple(state)
    memo = getattr(model, "_kvtier_adapter_memo", None)
    if memo is not None and memo[0] == key:
        return str(memo[1])
    h = hashlib.blake2b(b"kvtier-hf-weights-v1", digest_size=16)
    with torch.no_grad():
        for p in params:
            flat = p.detach().reshape(-1)
            n = flat.numel()
            k = min(n, 32)
            idx = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[idx].float().cpu().numpy().tobytes())
    h.update(repr(state[len(params) :]).encode())
    out = h.hexdigest()
    model._kvtier_adapter_memo = (key, out)
    return out


def _names(x: Any) -> list[str]:
    if callable(x):
        x = x()
    return [x] if isinstance(x, str) else [str(n) for n in x]
