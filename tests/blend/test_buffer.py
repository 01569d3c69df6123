"""The blend's one KV buffer and its attention masks: no prompt-sized copies, causal fast paths."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.blend.helpers import tiny_model
from tests.integrations.helpers import make_engine, random_ids

from kvtier.blend import forward as fw
from kvtier.integrations import transformers as kvt


def test_attention_masks_take_the_causal_fast_paths_only_for_contiguous_tails() -> None:
    from torch.nn.attention.bias import CausalBias

    seq = 10
    assert fw._attn_mask(torch.arange(0, seq), seq, torch.float32, "sdpa") is None
    tail = fw._attn_mask(torch.arange(4, seq), seq, torch.float32, "sdpa")
    assert isinstance(tail, CausalBias)
    # lower-right: query j (position 4 + j) sees keys 0..4+j, the same as the explicit mask
    dense = fw._mask(torch.arange(4, seq), seq, torch.float32)[0, 0] == 0
    assert tail._materialize().equal(dense)  # the test can fail: upper-left would differ
    picked = fw._attn_mask(torch.tensor([2, 5, 9]), seq, torch.float32, "sdpa")
    assert isinstance(picked, torch.Tensor) and picked.shape == (1, 1, 3, seq)
    assert fw._attn_mask(torch.arange(0, seq), seq, torch.float32, "eager").shape == (1, 1, seq, seq)


def test_cache_layers_are_views_of_the_one_buffer() -> None:
    model = tiny_model("llama")
    ids = random_ids(30, 0, 512)
    kv = torch.zeros((3, 2, 30, 2, 16))
    buf = fw.KVBuffer.from_kv(kv)
    reused = torch.zeros(30, dtype=torch.bool)
    out = fw.blend_forward(model, ids, buf, prefix=0, reused=reused, recompute_ratio=0.0)
    for i, layer in enumerate(out.cache.layers):
        assert layer.keys.data_ptr() == buf.keys(i).data_ptr()
        assert layer.values.data_ptr() == buf.values(i).data_ptr()


@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_segment_chunks_are_released_after_the_blend(ratio: float) -> None:
    model: Any = tiny_model("llama")
    head, q = random_ids(9, 0, 512)[0], random_ids(7, 1, 512)[0]
    docs = [random_ids(n, 2 + i, 512)[0] for i, n in enumerate((40, 33))]
    with make_engine() as eng:
        ids = torch.cat([head, *docs, q])[None]
        spans = [(9, 49), (49, 82)]
        kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=ratio)
        ids2 = torch.cat([head, docs[1], docs[0], q])[None]
        r = kvt.prefill(model, ids2, eng, segments=[(9, 42), (42, 82)], recompute_ratio=ratio, store=False)
        assert r.segment_tokens == 73
        assert not any(e.obj.pinned for e in eng.storage.top._entries.values())


def test_segment_sink_head_makes_the_first_document_exact_and_keys_hold_the_sink() -> None:
    """Segments computed after the prompt's head: the document right after the same head gets the
    rows full prefill computes (no re-rotation, same context); another head never matches; ratio 1
    is still a full prefill."""
    from tests.integrations.helpers import full_logits

    from kvtier.blend import SegmentStore
    from kvtier.blend.prefill import segment_kv
    from kvtier.transfer.layerwise import cache_to_kv

    model: Any = tiny_model("llama")
    head, q = random_ids(16, 0, 512)[0], random_ids(7, 1, 512)[0]
    docs = [random_ids(n, 2 + i, 512)[0] for i, n in enumerate((40, 33))]
    ids = torch.cat([head, *docs, q])[None]
    spans = [(16, 56), (56, 89)]
    with make_engine() as eng:
        ex = kvt._request_keys(eng, model, ids, {}) if kvt.bind_engine(eng, model) else None
        extras = ex[0] if ex else None
        SegmentStore(eng, extras).store(docs[0], segment_kv(model, docs[0]))  # no sink (the default)
        assert SegmentStore(eng, extras).lookup(docs[0]) == 40
        assert SegmentStore(eng, extras, head).lookup(docs[0]) == 0  # the sink is in the key
        rev = torch.cat([head, docs[1], docs[0], q])[None]
        r = kvt.prefill(
            model, rev, eng, segments=[(16, 49), (49, 89)], recompute_ratio=0.0, segment_sink="head"
        )
        assert r.segment_tokens == 0  # cold for this sink: computed, stored after the head
        assert SegmentStore(eng, extras, head).lookup(docs[0]) == 40
        exact = segment_kv(model, docs[0], head)
        full = cache_to_kv(kvt.prefill(model, ids, make_engine()).cache, 56)[:, :, 16:]
        torch.testing.assert_close(exact, full, rtol=0, atol=1e-5)
        naive = kvt.prefill(
            model, ids, eng, segments=spans, recompute_ratio=0.0, segment_sink="head", store=False
        )
        assert naive.segment_tokens == 73
        k_first = cache_to_kv(naive.cache, 56)[:, :, 16:]
        torch.testing.assert_close(k_first, full, rtol=0, atol=1e-5)  # document 1: as full prefill
        one = kvt.prefill(
            model, ids, eng, segments=spans, recompute_ratio=1.0, segment_sink="head", store=False
        )
        torch.testing.assert_close(one.logits, full_logits(model, ids), rtol=0, atol=1e-4)
        other = torch.cat([random_ids(16, 9, 512)[0], *docs, q])[None]
        o = kvt.prefill(
            model, other, eng, segments=spans, recompute_ratio=0.0, segment_sink="head", store=False
        )
        assert o.segment_tokens == 0  # another head: another sink, no segment hits


def test_bad_segment_sink_is_a_clear_error() -> None:
    from kvtier.blend import BlendError

    model: Any = tiny_model("llama")
    ids = random_ids(40, 0, 512)
    with make_engine() as eng, pytest.raises(BlendError, match="reaches into the segment"):
        kvt.prefill(model, ids, eng, segments=[(5, 20)], segment_sink=8)
    with make_engine() as eng, pytest.raises(BlendError, match="'head' or a token count"):
        kvt.prefill(model, ids, eng, segments=[(5, 20)], segment_sink="tail")
