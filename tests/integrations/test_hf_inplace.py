"""In-place cache layers (``hf_layers.InPlaceLayer``): a hit copies its prefix once, no ``cat``.

Before: every layer's ``DynamicLayer.update`` concatenated the loaded prefix onto an empty tensor,
then the computed token onto the prefix (two full-size copies per layer and plane, a third per
decoded token). The dispatch log below sees every aten op of a CPU hit; a past-sized ``cat`` fails.
Correctness against fresh prefills: fp32 logits within 1e-4, greedy and beam outputs identical.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine, random_ids
from torch.utils._python_dispatch import TorchDispatchMode

from kvtier.integrations import transformers as kvt
from kvtier.integrations.hf_cache import KVTierCache, LayerwiseKV, cache_to_kv
from kvtier.integrations.hf_layers import GROW_MIN, InPlaceLayer, LayerGeometryError
from kvtier.models import load_model

ATOL = 1e-4


class _OpLog(TorchDispatchMode):
    """Records (op, output shape) of the copying ops a forward runs."""

    WATCH = ("aten.cat", "aten.copy_", "aten.clone", "aten._to_copy", "aten.index_select")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in self.WATCH and isinstance(out, torch.Tensor):
            self.ops.append((name, tuple(out.shape)))
        return out

    def past_sized(self, op: str, past: int) -> list[tuple[str, tuple[int, ...]]]:
        """``op`` calls whose output holds >= ``past`` positions in some dimension of a KV tensor."""
        return [(n, s) for n, s in self.ops if n == op and len(s) >= 3 and max(s[-3:-1] + s[:0]) >= past]


def _aliases(layer: Any) -> bool:
    buf = getattr(layer, "buf", None)
    return buf is not None and all(
        t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for t in (layer.keys, layer.values)
    )


@pytest.fixture(scope="module")
def llama() -> Any:
    return load_model("random:llama-tiny").model


def test_full_hit_copies_the_prefix_once_and_concatenates_nothing(llama: Any) -> None:
    eng = make_engine()
    ids = random_ids(200, seed=21)
    kvt.prefill(llama, ids, eng)
    with torch.inference_mode(), _OpLog() as log:
        hit = kvt.prefill(llama, ids, eng, store=False)
    assert hit.hit_tokens == 199
    torch.testing.assert_close(hit.logits, full_logits(llama, ids), atol=ATOL, rtol=0)
    assert log.past_sized("aten.cat", 199) == []  # was 4 per layer (install + append, keys and values)
    n_layers = len(hit.cache.layers)
    fills = [s for n, s in log.ops if n == "aten.copy_" and 199 in s and len(s) == 4]
    assert len(fills) == n_layers  # one [P, n, H, D] copy per layer: the prefix into its buffer
    assert all(_aliases(layer) for layer in hit.cache.layers)  # keys/values: views of one buffer
    assert all(layer.capacity >= 200 + 256 for layer in hit.cache.layers)


def test_decode_after_a_hit_writes_in_place(llama: Any) -> None:
    eng = make_engine()
    ids = random_ids(120, seed=22)
    kvt.prefill(llama, ids, eng)
    r = kvt.prefill(llama, ids, eng, store=False)
    ptrs = [layer.buf.data_ptr() for layer in r.cache.layers]
    want = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    tok, got = r.next_token, [int(r.next_token)]
    with torch.inference_mode(), _OpLog() as log:
        for _ in range(5):
            logits = llama(input_ids=tok, **{kvt.cache_kwarg(llama): r.cache}, use_cache=True).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            got.append(int(tok))
    assert got == want[0, 120:].tolist()
    assert log.past_sized("aten.cat", 120) == []
    assert [layer.buf.data_ptr() for layer in r.cache.layers] == ptrs  # no reallocation
    assert r.cache.get_seq_length() == 125


def test_a_miss_attends_over_its_own_tensors_and_decode_moves_them_into_a_buffer(llama: Any) -> None:
    """A recomputed prefill holds each layer's KV as computed (no buffer, no copy: the plain
    forward's speed, ``bench_load_cost.py``); the first decoded token copies it into a buffer
    for the capacity, later ones write in place; the tokens equal ``model.generate``'s."""
    eng = make_engine()
    ids = random_ids(90, seed=24)
    with torch.inference_mode(), _OpLog() as log:
        r = kvt.prefill(llama, ids, eng, store=False)
    assert r.hit_tokens == 0
    assert log.past_sized("aten.copy_", 90) == []  # the prompt's KV was not copied into buffers
    assert all(layer.buf is None and layer.keys.shape[-2] == 90 for layer in r.cache.layers)
    torch.testing.assert_close(r.logits, full_logits(llama, ids), atol=ATOL, rtol=0)
    want = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    tok, got = r.next_token, [int(r.next_token)]
    for step in range(3):
        with torch.inference_mode():
            logits = llama(input_ids=tok, **{kvt.cache_kwarg(llama): r.cache}, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        got.append(int(tok))
        assert all(_aliases(layer) and layer.capacity >= 90 + 256 for layer in r.cache.layers)
        if step == 0:
            ptrs = [layer.buf.data_ptr() for layer in r.cache.layers]
    assert got == want[0, 90:].tolist()
    assert [layer.buf.data_ptr() for layer in r.cache.layers] == ptrs  # in place after the first
    assert r.cache.get_seq_length() == 93
    assert kvt.prefill(llama, ids, eng).stored_tokens > 0  # a miss stores from the held tensors
    hit = kvt.prefill(llama, ids, eng, store=False)
    assert hit.hit_tokens == 89
    torch.testing.assert_close(hit.logits, full_logits(llama, ids), atol=ATOL, rtol=0)


def test_generate_greedy_and_beams_equal_model_generate(llama: Any) -> None:
    eng = make_engine()
    ids = random_ids(60, seed=23)
    kvt.prefill(llama, ids, eng)  # the prompt is cached: generate loads 59 positions
    for kw in (
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3),
        dict(do_sample=False, num_beams=2, num_return_sequences=2),
    ):
        want = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, **kw)
        got = kvt.generate(llama, ids, eng, max_new_tokens=7, **kw)
        assert torch.equal(got, want), kw
    assert eng.stats().hit_tokens >= 3 * 59


def test_layer_grows_crops_and_adopts_replaced_tensors() -> None:
    layer = InPlaceLayer(capacity=4)
    k = torch.randn(2, 3, 3, 5)
    v = torch.randn(2, 3, 3, 5)
    ko, vo = layer.update(k, v)
    assert layer.capacity == 4 and _aliases(layer) and torch.equal(ko, k) and torch.equal(vo, v)
    k2, v2 = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5)
    ko, vo = layer.update(k2, v2)  # past the capacity: grows, keeps the positions held
    assert layer.capacity == 3 + 2 + GROW_MIN - 1 or layer.capacity >= 4 + GROW_MIN
    torch.testing.assert_close(ko, torch.cat([k, k2], 2), atol=0, rtol=0)
    torch.testing.assert_close(vo, torch.cat([v, v2], 2), atol=0, rtol=0)
    ptr = layer.buf.data_ptr()
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and layer.buf.data_ptr() == ptr and _aliases(layer)
    torch.testing.assert_close(layer.keys, k, atol=0, rtol=0)
    layer.reorder_cache(torch.tensor([1, 0]))  # transformers replaces the tensors (beam search)
    ko, _ = layer.update(k2[:, :, :1], v2[:, :, :1])
    assert _aliases(layer) and ko.shape == (2, 3, 4, 5)
    torch.testing.assert_close(ko[:, :, :3], k.flip(0), atol=0, rtol=0)
    with pytest.raises(LayerGeometryError, match="do not fit"):
        layer.update(torch.randn(2, 4, 1, 5), torch.randn(2, 4, 1, 5))
    layer.reset()
    assert layer.buf is None and layer.get_seq_length() == 0


def test_latent_layer_keeps_one_row_and_odd_heads_fall_back() -> None:
    mla = InPlaceLayer()
    k, v = torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 3)
    ko, vo = mla.update(k, v)
    assert mla.buf is not None and mla.buf.shape[0] == 1 and mla.buf.shape[-1] == 11 and mla.split == 8
    torch.testing.assert_close(ko, k, atol=0, rtol=0)
    torch.testing.assert_close(vo, v, atol=0, rtol=0)
    odd = InPlaceLayer()
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    ko, vo = odd.update(k, v)  # heads differ: plain DynamicLayer behaviour
    assert odd.buf is None and torch.equal(ko, k) and torch.equal(vo, v)
    ko, _ = odd.update(k[:, :, :1], v[:, :, :1])
    assert ko.shape == (1, 2, 5, 8)


def test_fill_from_host_rows_is_bit_exact_for_a_batch(llama: Any) -> None:
    eng = make_engine()
    rows = torch.cat([random_ids(41, seed=24), random_ids(41, seed=25)])
    ref = kvt.prefill(llama, rows, eng, store=False)
    kvs = [cache_to_kv(ref.cache, 40, batch_index=b) for b in range(2)]
    cache = KVTierCache(llama.config, LayerwiseKV(kvs, torch.device("cpu")), capacity=64)
    with torch.inference_mode():
        logits = llama(input_ids=rows[:, 40:], **{kvt.cache_kwarg(llama): cache}, use_cache=True).logits[
            :, -1
        ]
    torch.testing.assert_close(logits, ref.logits, atol=ATOL, rtol=0)
    for b in range(2):
        torch.testing.assert_close(cache_to_kv(cache, 40, batch_index=b), kvs[b], atol=0, rtol=0)
    assert all(_aliases(layer) and layer.capacity == 64 for layer in cache.layers)
