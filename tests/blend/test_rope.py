"""RoPE re-rotation: cached keys moved to a new position equal the keys computed there."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.blend.helpers import kv_at, tiny_model

from kvtier.blend import BlendError, rerotate_kv, rope_spec

pytest.importorskip("transformers")

ROPES: list[dict[str, Any] | None] = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: (r or {}).get("rope_type", "default"))
@pytest.mark.parametrize("start", [7, 3001])
def test_rerotated_keys_match_keys_computed_at_the_position(rope: dict[str, Any] | None, start: int) -> None:
    model = tiny_model("llama", rope)
    tokens = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))
    at0, want = kv_at(model, tokens, 0), kv_at(model, tokens, start)
    got = rerotate_kv(at0, 0, start, rope_spec(model))
    assert got[:, 1].equal(at0[:, 1])  # values are position-free: untouched
    # Layer 0's keys depend on the token and position only: within a few float32 ulps (measured 6e-8).
    torch.testing.assert_close(got[0, 0], want[0, 0], rtol=0, atol=5e-7)
    # Deeper layers: attention is relative, so the whole stack is shift-invariant up to rounding.
    torch.testing.assert_close(got, want, rtol=0, atol=5e-6)
    # and the un-rotated keys are clearly wrong there (the test can fail)
    assert (at0[:, 0] - want[:, 0]).abs().max() > 0.1


def test_yarn_scaling_is_not_applied_twice() -> None:
    """YaRN multiplies cos/sin by mscale; a re-rotation must be a pure rotation (norms kept)."""
    model = tiny_model("llama", ROPES[3])
    assert model.model.rotary_emb.attention_scaling != 1.0
    kv = kv_at(model, torch.arange(20), 0)
    got = rerotate_kv(kv, 0, 500, rope_spec(model))
    torch.testing.assert_close(got[:, 0].norm(dim=-1), kv[:, 0].norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_qwen3_and_mistral_are_supported() -> None:
    for mt, extra in (("qwen3", {"head_dim": 16}), ("mistral", {"sliding_window": None})):
        model = tiny_model(mt, **extra)
        tokens = torch.arange(30)
        got = rerotate_kv(kv_at(model, tokens, 0), 0, 100, rope_spec(model))
        torch.testing.assert_close(got, kv_at(model, tokens, 100), rtol=0, atol=2e-4)


@pytest.mark.parametrize(
    ("rope", "needle"),
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
        (
            {
                "rope_type": "longrope",
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 256,
            },
            "longrope",
        ),
    ],
)
def test_sequence_dependent_ropes_are_refused(rope: dict[str, Any], needle: str) -> None:
    with pytest.raises(BlendError, match=needle):
        rope_spec(tiny_model("llama", rope))


def test_non_rope_model_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(BlendError, match="gpt2.*re-rotatable"):
        rope_spec(model)


def test_partial_rotary_is_refused() -> None:
    model = tiny_model("llama")
    model.config.partial_rotary_factor = 0.5
    with pytest.raises(BlendError, match="partial rotary"):
        rope_spec(model)


def test_a_plain_theta_rotation_is_wrong_for_scaled_ropes() -> None:
    """Why the model's own tables: the closed-form default rope misplaces llama3-scaled keys."""
    from kvtier.transfer.rope import rerotate

    model = tiny_model("llama", ROPES[2])
    tokens = torch.arange(40)
    at0, want = kv_at(model, tokens, 0), kv_at(model, tokens, 3001)
    pos0, pos1 = torch.arange(40), torch.arange(3001, 3041)
    plain = rerotate(at0[0, 0], pos0, pos1, 10000.0)
    assert (plain - want[0, 0]).abs().max() > 0.05
    torch.testing.assert_close(
        rerotate_kv(at0, 0, 3001, rope_spec(model))[0, 0], want[0, 0], rtol=0, atol=2e-5
    )
