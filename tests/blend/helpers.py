"""Helpers for the blend tests: tiny models with a chosen rope config, and RAG-shaped prompts."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from kvtier.models import cache_kwarg
from kvtier.transfer.layerwise import cache_to_kv


def tiny_model(model_type: str = "llama", rope: dict[str, Any] | None = None, **extra: Any) -> Any:
    """A 3-layer fp32 model of ``model_type`` with ``rope`` as its rope parameters (seeded weights)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    kwargs.update(extra)
    if rope is not None:
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.config._name_or_path = f"tiny-{model_type}-{(rope or {}).get('rope_type', 'default')}"
    return model


@torch.inference_mode()
def kv_at(model: Any, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """The KV of ``tokens`` computed on their own at positions ``start..``: ``[L, 2, n, H, D]``."""
    n = int(tokens.numel())
    c = DynamicCache(config=model.config)
    pos = torch.arange(start, start + n, device=tokens.device)[None]
    model(
        input_ids=tokens[None], position_ids=pos, **{cache_kwarg(model): c}, use_cache=True, logits_to_keep=1
    )
    return cache_to_kv(c, n)


def rag_prompt(
    head: torch.Tensor, docs: list[torch.Tensor], question: torch.Tensor
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``head + docs... + question`` as ``[1, S]`` and the documents' spans."""
    spans, pos = [], int(head.numel())
    for d in docs:
        spans.append((pos, pos + int(d.numel())))
        pos += int(d.numel())
    return torch.cat([head, *docs, question])[None], spans
