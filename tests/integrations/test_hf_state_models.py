"""Models whose cache is not per-position K/V are refused before anything is looked up or stored,
with an error naming the layer type: Mamba/SSM, hybrid attention + Mamba (Jamba, Bamba),
convolution (LFM2), chunked local attention (Llama-4). Tiny random models built in code."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers as tf
from tests.integrations.helpers import make_engine, random_ids

from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_cache import _layer_types

S: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
)


def _mamba() -> Any:
    return tf.MambaForCausalLM(
        tf.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4)
    )


def _jamba() -> Any:
    cfg = tf.JambaConfig(**S, num_experts=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4)
    return tf.JambaForCausalLM(cfg)


def _bamba() -> Any:
    cfg = tf.BambaConfig(
        **S, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1
    )
    return tf.BambaForCausalLM(cfg)


def _lfm2() -> Any:
    return tf.Lfm2ForCausalLM(tf.Lfm2Config(**S, layer_types=["conv", "full_attention"]))


def _llama4() -> Any:
    cfg = tf.Llama4TextConfig(
        **S, attention_chunk_size=16, num_local_experts=1, intermediate_size_mlp=64, head_dim=16
    )
    return tf.Llama4ForCausalLM(cfg)


CASES = [
    (_mamba, "linear_attention", "Mamba/SSM"),
    (_jamba, "linear_attention", "Mamba/SSM"),
    (_bamba, "linear_attention", "Mamba/SSM"),
    (_lfm2, "conv", "convolution"),
    (_llama4, "chunked_attention", "chunked local attention"),
]


@pytest.mark.parametrize(
    ("make", "layer_type", "reason"), CASES, ids=["mamba", "jamba", "bamba", "lfm2", "llama4"]
)
def test_state_and_chunked_models_are_refused_naming_the_layer_type(
    make: Any, layer_type: str, reason: str
) -> None:
    torch.manual_seed(0)
    model = make().eval()
    ids = random_ids(20, vocab=128)
    with make_engine(chunk_tokens=8) as engine:
        with pytest.raises(kvt.IntegrationError, match=layer_type) as err:
            kvt.prefill(model, ids, engine)
        assert reason in str(err.value) and model.config.model_type in str(err.value)
        with pytest.raises(kvt.IntegrationError, match=layer_type):
            kvt.generate(model, ids, engine, max_new_tokens=2, do_sample=False)
        s = engine.stats()
        assert s.lookups == 0 and s.stores == 0 and engine.namespace is None


def test_configs_without_layer_types_are_classified_as_transformers_does() -> None:
    """Older transformers configs name no ``layer_types``: SSM fields mean state layers, a window
    means every layer local, a chunk size chunked."""
    assert _layer_types(SimpleNamespace(num_hidden_layers=2, state_size=16)) == ["mamba", "mamba"]
    assert _layer_types(SimpleNamespace(num_hidden_layers=2, sliding_window=8)) == ["sliding_attention"] * 2
    assert _layer_types(SimpleNamespace(num_hidden_layers=1, attention_chunk_size=8)) == ["chunked_attention"]
    assert _layer_types(SimpleNamespace(num_hidden_layers=1)) == ["full_attention"]
    assert _layer_types(SimpleNamespace(layers_block_type=["mamba", "attention"])) == ["mamba", "attention"]
