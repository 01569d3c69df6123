"""Sliding-window and interleaved local/global attention in the transformers integration.

Tiny random models built in code, prompts longer than the window (16): Mistral/Phi3
``sliding_window`` (every layer local), Qwen2 ``use_sliding_window`` (local from
``max_window_layers`` on) and Gemma-3 ``layer_types`` (local and global interleaved). A prefix
hit must reproduce the fresh prefill (fp32 logits within 1e-4, greedy tokens identical), also
for a prefix that crossed the window during generation (issue 22 #4: a plain sliding cache had
dropped its first positions by then), and the window is part of the key.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine, random_ids
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_cache import KVTierCache, attention_signature

WINDOW = 16
SMALL: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
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


def _qwen2(window: int | None) -> Any:
    torch.manual_seed(0)  # layer 0 global, layers 1-2 local (from max_window_layers on)
    cfg = Qwen2Config(
        use_sliding_window=window is not None, sliding_window=window or 4096, max_window_layers=1, **SMALL
    )
    return Qwen2ForCausalLM(cfg).eval()


def _gemma3(window: int | None) -> Any:
    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    if window is None:
        types = ["full_attention"] * 3
    cfg = Gemma3TextConfig(sliding_window=window or 4096, layer_types=types, head_dim=16, **SMALL)
    return Gemma3ForCausalLM(cfg).eval()


MODELS = [_mistral, _phi3, _qwen2, _gemma3]
IDS = ["mistral", "phi3", "qwen2", "gemma3"]


def _local_layers(model: Any) -> list[bool]:
    from transformers import DynamicCache

    return [bool(getattr(x, "is_sliding", False)) for x in DynamicCache(config=model.config).layers]


@pytest.mark.parametrize("make", MODELS, ids=IDS)
def test_prefix_hit_past_the_window_equals_fresh_prefill(make: Any) -> None:
    model = make(WINDOW)
    local = _local_layers(model)
    assert any(local), "the tiny model must have local layers"
    if make is _gemma3 or make is _qwen2:
        assert not all(local)  # interleaved: global and local layers
    ids = random_ids(3 * WINDOW, vocab=256)
    ref = full_logits(model, ids)
    # the window matters for this prompt: the same weights without it give other logits
    assert (full_logits(make(None), ids) - ref).abs().max() > 1e-3
    with make_engine(chunk_tokens=8) as engine:
        first = kvt.prefill(model, ids, engine)
        assert first.hit_tokens == 0 and first.stored_tokens == ids.shape[1]
        again = kvt.prefill(model, ids, engine)
        assert again.hit_tokens == ids.shape[1] - 1 > WINDOW
        assert (again.logits - ref).abs().max() < 1e-4
        assert torch.equal(again.next_token, ref.argmax(-1, keepdim=True))
        longer = torch.cat([ids, random_ids(10, seed=1, vocab=256)], dim=1)  # a continuation: prefix hit
        hit = kvt.prefill(model, longer, engine)
        assert hit.hit_tokens == 48
        assert (hit.logits - full_logits(model, longer)).abs().max() < 1e-4


@pytest.mark.parametrize("make", MODELS, ids=IDS)
def test_generation_crossing_the_window_is_stored_and_reused_exactly(make: Any) -> None:
    """Issue 22 #4: a prompt shorter than the window whose generation crosses it. A plain sliding
    cache has dropped the first positions by the end; ``KVTierCache`` keeps them, so the prompt and
    the generated tokens are stored as the KV of their own positions, and a later call on that
    text (a hit across the window) generates what a fresh ``generate`` does."""
    model = make(WINDOW)
    ids = random_ids(10, vocab=256)
    with make_engine(chunk_tokens=8) as engine:
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)
        out = kvt.generate(model, ids, engine, max_new_tokens=12, do_sample=False, store_generated=True)
        assert torch.equal(out, ref)
        assert engine.stats().stored_tokens == 21  # prompt + generated tokens that have KV: past the window
        follow = out[:, :21]
        want = model.generate(follow, max_new_tokens=6, do_sample=False)
        got = kvt.generate(model, follow, engine, max_new_tokens=6, do_sample=False)
        assert engine.stats().hit_tokens == 21  # the lookup finds all of it (generate recomputes one)
        assert torch.equal(got, want)


@pytest.mark.parametrize("make", MODELS, ids=IDS)
def test_the_window_is_part_of_the_key(make: Any) -> None:
    """The same weights with and without the window compute other KV past it: other namespaces,
    so an engine bound to one never serves the other (here: a plain prefill and a warning)."""
    windowed, full = make(WINDOW), make(None)
    assert attention_signature(windowed) != "" and attention_signature(full) == ""
    ids = random_ids(40, vocab=256)
    with make_engine(chunk_tokens=8) as engine:
        kvt.prefill(windowed, ids, engine)
        r = kvt.prefill(full, ids, engine)
        assert r.hit_tokens == 0 and r.stored_tokens == 0
        assert (r.logits - full_logits(full, ids)).abs().max() < 1e-4


def test_kvtier_cache_keeps_every_position_of_local_layers() -> None:
    """What makes storing past the window possible: no layer of ``KVTierCache`` drops positions."""
    model = _gemma3(WINDOW)
    cache = KVTierCache(model.config)
    with torch.inference_mode():
        model(input_ids=random_ids(40, vocab=256), **{kvt.cache_kwarg(model): cache}, use_cache=True)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [40, 40, 40]
    assert not any(cache.is_sliding)


@pytest.mark.parametrize("make", [_mistral, _phi3], ids=["mistral", "phi3"])
def test_without_a_window_or_with_one_past_the_context_it_works(make: Any) -> None:
    """``sliding_window=None``, or a window no prompt can reach, is full attention: supported, exact."""
    for window in (None, SMALL["max_position_embeddings"]):
        model = make(window)
        ids = random_ids(24, vocab=256)
        with make_engine(chunk_tokens=8) as engine:
            ref = model.generate(ids, max_new_tokens=8, do_sample=False)
            first = kvt.generate(model, ids, engine, max_new_tokens=8, do_sample=False, store_generated=True)
            again = kvt.generate(model, ids, engine, max_new_tokens=8, do_sample=False)  # a hit
            assert engine.stats().hit_tokens > 0
            assert torch.equal(first, ref) and torch.equal(again, ref)
