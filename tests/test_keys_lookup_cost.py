"""The lookup paths' arithmetic over keys: what ``lookup_by_cost`` weighs equals the per-key sum."""

from __future__ import annotations

import pytest
import torch

from kvtier import CacheEngine, Config


@pytest.mark.parametrize("codec", ["none", "int4"])
@pytest.mark.parametrize("n", [1, 63, 64, 200, 256 + 17])
def test_keyed_bytes_equal_the_sum_over_the_keys(codec: str, n: int) -> None:
    """``_keyed_nbytes`` counts by chunk size (one full chunk's size times their number, plus the
    tail) instead of summing 512 keys on a 128k lookup; with a grouped codec a tail chunk's bytes
    are not proportional to its tokens, so both must still agree exactly."""
    cfg = Config.load(env={}, chunk_tokens=64, cpu__max_bytes="64MiB", cpu__pin_memory="no", kv_codec=codec)
    eng = CacheEngine(cfg)
    try:
        eng.bind_model(2, 2, 64, torch.bfloat16)
        keys = eng.keys(list(range(n)))
        assert keys[-1].end == n
        assert eng._keyed_nbytes(n) == sum(eng._stored_nbytes(k.num_tokens) for k in keys)
    finally:
        eng.close()
