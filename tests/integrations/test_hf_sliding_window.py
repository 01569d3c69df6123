"""Issue 22 #4: sliding-window models whose config has no ``layer_types`` (Mistral v0.1-style,
Phi3 with ``sliding_window``) keep only the last ``window`` positions in their cache. kvtier's
transformers integration refuses them with a message naming the window, before anything is
looked up or stored: it must never store KV of the wrong positions."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import make_engine, random_ids
from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM

from kvtier.integrations import transformers as kvt

WINDOW = 16
SMALL: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _mistral(window: int | None) -> Any:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(sliding_window=window, **SMALL)).eval()


def _phi3(window: int | None) -> Any:
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(sliding_window=window, pad_token_id=0, **SMALL)).eval()


@pytest.mark.parametrize("make", [_mistral, _phi3], ids=["mistral", "phi3"])
def test_generation_crossing_the_window_is_refused_and_stores_nothing(make: Any) -> None:
    """A prompt shorter than the window whose generation crosses it: before the fix the cache had
    dropped the first positions by the time the prompt's KV was stored, so positions 14..23 were
    stored as 0..9 and the next call (a hit) generated different tokens; with ``store_generated``
    it failed after generating, naming no window. Now: a clear error naming the window, up front."""
    model = make(WINDOW)
    ids = random_ids(10, vocab=256)
    with make_engine(chunk_tokens=8) as engine:
        with pytest.raises(kvt.IntegrationError, match=f"sliding_window={WINDOW}") as err:
            kvt.generate(model, ids, engine, max_new_tokens=20, do_sample=False)
        with pytest.raises(kvt.IntegrationError, match=f"sliding_window={WINDOW}"):
            kvt.generate(model, ids, engine, max_new_tokens=20, do_sample=False, store_generated=True)
        assert "sliding_window=None" in str(err.value)  # says what to do
        with pytest.raises(kvt.IntegrationError, match=f"sliding_window={WINDOW}"):
            kvt.prefill(model, random_ids(40, vocab=256), engine)  # longer than the window
        s = engine.stats()
        assert s.stores == 0 and s.lookups == 0


@pytest.mark.parametrize("make", [_mistral, _phi3], ids=["mistral", "phi3"])
def test_without_a_window_or_with_one_past_the_context_it_works(make: Any) -> None:
    """``sliding_window=None``, or a window no prompt can reach, is full attention: supported, exact."""
    for window in (None, SMALL["max_position_embeddings"]):
        model = make(window)
        ids = random_ids(24, vocab=256)
        with make_engine(chunk_tokens=8) as engine:
            ref = model.generate(ids, max_new_tokens=20, do_sample=False)
            first = kvt.generate(model, ids, engine, max_new_tokens=20, do_sample=False, store_generated=True)
            again = kvt.generate(model, ids, engine, max_new_tokens=20, do_sample=False)  # a hit
            assert engine.stats().hit_tokens > 0
            assert torch.equal(first, ref) and torch.equal(again, ref)
