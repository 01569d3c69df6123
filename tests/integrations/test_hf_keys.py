"""The transformers integration keys what besides the tokens changes the KV: images, weights, adapters.

Each test makes two calls that differ only in one such input and checks that the second gets no
KV computed under the first (and matches a plain ``model.generate`` / fresh prefill). With the
input left out of the key, the second call is served the first one's KV and these tests fail.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine

from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_keys import Uncacheable, input_extras

IMG = 299  # the placeholder token id
N_IMG = 4  # image tokens per image: (16 / 8) ** 2 patches


@pytest.fixture(scope="module")
def llava() -> Any:
    """A tiny random LLaVA (CLIP vision tower + Llama), built in code."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=32,
    )
    tc = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        image_token_id=IMG,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a wider logit spread: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
        for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            lin.weight.mul_(30.0)  # images that move the text's hidden states, not a rounding error
    return model


def image_prompt(text_before: int = 40, text_after: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    before = torch.randint(3, 290, (text_before,), generator=g)
    after = torch.randint(3, 290, (text_after,), generator=g)
    return torch.cat([before, torch.full((N_IMG,), IMG), after]).unsqueeze(0)


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


GEN: dict[str, Any] = {
    "max_new_tokens": 4,
    "do_sample": False,
    "return_dict_in_generate": True,
    "output_logits": True,
}


def reference(model: Any, ids: torch.Tensor, pv: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model.generate(ids, pixel_values=pv, attention_mask=torch.ones_like(ids), **GEN)


def assert_same(got: Any, want: Any) -> None:
    assert torch.equal(got.sequences, want.sequences)
    for g, w in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


def test_two_images_behind_the_same_placeholders_never_share_kv(llava: Any) -> None:
    engine = make_engine()
    ids = image_prompt()
    a, b = pixels(1), pixels(2)
    want_a, want_b = reference(llava, ids, a), reference(llava, ids, b)
    assert (want_a.logits[0] - want_b.logits[0]).abs().max() > 0.05  # the image matters
    assert_same(kvt.generate(llava, ids, engine, pixel_values=a, store_generated=True, **GEN), want_a)
    hits = engine.stats().hit_tokens
    got_b = kvt.generate(llava, ids, engine, pixel_values=b, **GEN)
    assert engine.stats().hit_tokens == hits, "image b was served KV computed with image a"
    assert_same(got_b, want_b)
    again = kvt.generate(llava, ids, engine, pixel_values=a, **GEN)
    assert engine.stats().hit_tokens - hits == 40  # the text before the image, keyed with image a
    assert_same(again, want_a)


def test_inputs_that_cannot_be_keyed_are_refused_or_counted(llava: Any) -> None:
    rows = image_prompt()
    with pytest.raises(Uncacheable, match="cannot be hashed"):
        input_extras(llava, rows, {"pixel_values": object()})
    keys = input_extras(llava, rows, {"pixel_values": pixels(1), "max_new_tokens": 3})
    assert keys.limit == 40 and keys.digest
    assert input_extras(llava, rows, {"max_new_tokens": 3, "do_sample": False}).digest == ""
    engine = make_engine()
    kvt.bind_engine(engine, llava)
    assert kvt._request_keys(engine, llava, rows, {"pixel_values": object()}) is None
    assert engine.stats().uncacheable_requests == 1


def test_weights_changed_after_binding_are_another_key() -> None:
    """A LoRA merged into one projection in place (``merge_and_unload``) changes the KV of every
    later layer; the namespace's weights digest, taken once, does not see it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model = LlamaForCausalLM(cfg).eval()
    engine = make_engine()
    ids = torch.randint(3, 300, (1, 50), generator=torch.Generator().manual_seed(1))
    assert kvt.prefill(model, ids, engine).stored_tokens == 50
    assert kvt.prefill(model, ids, engine).hit_tokens == 49  # control: a hit while nothing changed
    proj = model.model.layers[0].self_attn.k_proj
    with torch.no_grad():  # a rank-4 update, as merging a LoRA adapter does
        a, b = torch.randn(4, proj.in_features), torch.randn(proj.out_features, 4)
        proj.weight.add_(0.2 * b @ a)
    r = kvt.prefill(model, ids, engine)
    assert r.hit_tokens == 0, "KV of the weights before the merge was served"
    torch.testing.assert_close(r.logits, full_logits(model, ids), atol=1e-4, rtol=0)


def test_the_integration_uses_the_cache_kwarg_of_this_transformers(llava: Any) -> None:
    """transformers 5.24 deprecates ``past_key_values=`` (removal announced for 5.40): no warning from kvtier."""
    import inspect
    import warnings

    want = "cache" if "cache" in inspect.signature(type(llava).forward).parameters else "past_key_values"
    assert kvt.cache_kwarg(llava) == want
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        kvt.generate(llava, image_prompt(), make_engine(), pixel_values=pixels(1), **GEN)


def test_adapter_identity_sees_tuner_flags_as_class_or_instance_attributes() -> None:
    """PEFT tuner layers expose ``disable_adapters`` as a class property; a layer may also set it
    on the instance. Toggling either (or merging) changes the identity; so does editing a weight."""
    from kvtier.integrations.hf_keys import adapter_identity

    class Tuner(torch.nn.Linear):
        @property
        def disable_adapters(self) -> bool:
            return self._off

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Tuner(4, 4)
            self.a._off = False
            self.a.active_adapters = ["x"]
            self.b = torch.nn.Linear(4, 4)
            self.b.disable_adapters = False
            self.b.active_adapters = ["y"]
            self.tied = self.b  # a shared module: its parameters count once

    m = Model()
    seen = {adapter_identity(m)}
    m.a._off = True  # the class property's value
    seen.add(adapter_identity(m))
    m.b.disable_adapters = True  # the instance attribute
    seen.add(adapter_identity(m))
    m.b.merged_adapters = ["y"]
    seen.add(adapter_identity(m))
    with torch.no_grad():
        m.a.weight.add_(1.0)
    seen.add(adapter_identity(m))
    assert len(seen) == 5
    assert adapter_identity(m) == adapter_identity(m)
