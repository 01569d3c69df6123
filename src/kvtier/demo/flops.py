"""Prefill FLOPs of a dense decoder, to report what a cache hit saves independently of the clock.

A timed speedup on a shared machine moves with everyone else's load; the work not done does
not. For a dense decoder-only transformer, prefilling tokens ``[start, end)`` on top of a cache
that holds ``[0, start)`` costs, per token, ``2 * P`` FLOPs of weight matmuls (``P``: parameters
outside the embedding and the LM head, which a prefill applies only to the last position) plus,
per layer, ``4 * heads * head_dim`` per (query, key) pair: ``Q @ K^T`` and ``weights @ V``, the
query at position ``t`` attending to ``t + 1`` keys. A hit of ``h`` tokens therefore saves
exactly ``flops(0, h)``. Norms, biases, activations and RoPE are left out (a few percent at most);
MoE models would be over-counted (every expert is counted as active).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrefillCost:
    """The two numbers that determine a dense decoder's prefill FLOPs."""

    matmul_params: int  # parameters applied to every prompt token
    attn_width: int  # num_layers * num_attention_heads * head_dim

    def flops(self, start: int, end: int) -> float:
        """FLOPs to compute positions ``[start, end)`` given the KV of ``[0, start)``."""
        if end <= start:
            return 0.0
        pairs = (end * (end + 1) - start * (start + 1)) // 2  # sum over t in [start, end) of t + 1
        return 2.0 * self.matmul_params * (end - start) + 4.0 * self.attn_width * pairs

    def saved(self, hit_tokens: int) -> float:
        """FLOPs a hit of ``hit_tokens`` leading tokens saves (whatever the prompt's length)."""
        return self.flops(0, hit_tokens)


def prefill_cost(model: Any) -> PrefillCost:
    """``PrefillCost`` of a transformers causal LM: its weight matrices (2-D parameters, so norms
    and biases are left out) other than the input embedding and the LM head."""
    cfg = model.config.get_text_config(decoder=True)
    skip = {
        id(m.weight)
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None and getattr(m, "weight", None) is not None
    }
    matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in skip)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return PrefillCost(matmul, int(cfg.num_hidden_layers) * heads * head_dim)


def human(flops: float) -> str:
    """``1.23 TFLOP``-style."""
    for unit, m in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= m:
            return f"{flops / m:.2f} {unit}"
    return f"{flops:.0f} FLOP"
