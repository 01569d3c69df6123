"""Helpers shared by the integration tests."""

from __future__ import annotations

from typing import Any

import torch

from kvtier import CacheEngine, Config


def make_engine(chunk_tokens: int = 16, **overrides: Any) -> CacheEngine:
    """An engine for correctness tests: load-or-recompute is off unless a test turns it on, since
    it weighs measured times and a tiny model's prefill can beat the timed CPU tier on a loaded
    machine (a hit the test expects becomes a recompute: test_hf_sliding_window, a CI run)."""
    overrides.setdefault("cost__enabled", False)
    cfg = Config.load(
        env={}, chunk_tokens=chunk_tokens, cpu__max_bytes="256MiB", cpu__pin_memory="no", **overrides
    )
    return CacheEngine(cfg)


def random_ids(n: int, seed: int = 0, vocab: int = 49152) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


@torch.inference_mode()
def full_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Reference: the last position's logits from a fresh full prefill."""
    return model(input_ids=ids).logits[:, -1]
