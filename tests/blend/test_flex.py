"""Flex attention in the blend's selected layers (``kvtier.blend.flex``), on CPU.

On CPU flex runs through its eager reference (torch 2.13's compiled CPU kernel does not build with
dynamic shapes); the block mask, the attention wrapper, the selection and the fallback are the
same code the CUDA path runs. ``tests/gpu/test_blend_cuda.py`` runs the compiled kernel."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.blend.helpers import kv_at, rag_prompt, tiny_model
from tests.integrations.helpers import full_logits, random_ids

from kvtier.blend import BlendError, flex
from kvtier.blend import forward as fw
from kvtier.blend.rope import rerotate_kv, rope_spec

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without flex_attention")


@pytest.fixture(autouse=True)
def _flex_state() -> Iterator[None]:
    """Each test starts and ends with flex enabled and the default kernels."""
    flex.enable()
    flex.set_kernel("cpu", None)
    yield
    flex.enable()
    flex.set_kernel("cpu", None)


def _rows_cases() -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    spread = torch.cat([torch.arange(5), torch.randperm(900, generator=g)[:170] + 5, torch.arange(995, 1000)])
    return [
        (spread.unique().sort().values, 1000),  # a blend's shape: sparse rows over the whole prompt
        (torch.arange(0, 300), 300),  # contiguous from 0: the causal triangle
        (torch.tensor([999]), 1000),  # one query (the last token)
        (torch.tensor([126, 127, 128, 255, 256, 383]), 384),  # positions on block edges
        (torch.arange(129, 640, 2), 641),  # key count one past a block multiple
    ]


def _implied(bm: Any, n: int, seq: int) -> torch.Tensor:
    """The ``[n, seq]`` mask a flex kernel applies with ``bm``: full key blocks wholly visible, partial
    ones through the mask function, any other block skipped."""
    b = flex.BLOCK
    out = torch.zeros(n, seq, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(seq)[None, :]
    mod = bm.mask_mod(0, 0, q_idx, kv_idx)
    for qb in range(-(-n // b)):
        qs = slice(qb * b, min(n, qb * b + b))
        for j in bm.full_kv_indices[0, 0, qb, : int(bm.full_kv_num_blocks[0, 0, qb])].tolist():
            out[qs, j * b : j * b + b] = True
        for j in bm.kv_indices[0, 0, qb, : int(bm.kv_num_blocks[0, 0, qb])].tolist():
            out[qs, j * b : j * b + b] = mod[qs, j * b : j * b + b]
    return out


@pytest.mark.parametrize("case", range(5))
def test_block_mask_applies_the_causal_rule_and_skips_what_create_block_mask_skips(case: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    rows, seq = _rows_cases()[case]
    n = int(rows.numel())
    got = flex.block_mask(rows, seq)
    # what the kernel computes: query i sees key j iff j <= rows[i]
    assert _implied(got, n, seq).equal(torch.arange(seq)[None, :] <= rows[:, None])
    ref = create_block_mask(
        lambda b, h, q, kv: kv <= rows[q], 1, 1, n, seq, device="cpu", BLOCK_SIZE=flex.BLOCK
    )
    # the same key blocks visited as the per-element builder (which calls a padded last query block
    # partial where this one calls it full: its padded queries' outputs are never written)
    assert got.to_dense().equal(ref.to_dense())
    assert got.full_kv_num_blocks is not None and ref.full_kv_num_blocks is not None
    whole = n // flex.BLOCK
    assert got.full_kv_num_blocks[..., :whole].equal(ref.full_kv_num_blocks[..., :whole])
    assert bool((got.full_kv_num_blocks >= ref.full_kv_num_blocks).all())


def test_block_mask_refuses_an_empty_query_set() -> None:
    with pytest.raises(flex.FlexUnsupported, match="needs queries"):
        flex.block_mask(torch.zeros(0, dtype=torch.long), 10)


def test_selected_rows_attention_equals_dense_masked_sdpa_with_gqa() -> None:
    rows, seq = _rows_cases()[0]
    n = int(rows.numel())
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, n, 16, generator=g)
    k, v = torch.randn(1, 2, seq, 16, generator=g), torch.randn(1, 2, seq, 16, generator=g)
    sel = flex.SelectedRows(rows, seq, flex.kernel(torch.device("cpu")))
    got = sel.attend(q, k, v, 0.3)  # [1, n, Hq, D]
    mask = torch.arange(seq)[None, :] <= rows[:, None]
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama", num_hidden_layers=4)


def _inputs(model: Any, head_len: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 500-token prompt (four query blocks of keys) of 3 documents whose KV, computed alone and
    re-rotated, fills their rows; ``force``: each document's first token."""
    head, q = random_ids(head_len, 1, 512)[0], random_ids(9, 2, 512)[0]
    docs = [random_ids(n, 3 + i, 512)[0] for i, n in enumerate((170, 140, 175))]
    ids, spans = rag_prompt(head, docs, q)
    seq = int(ids.shape[1])
    full = kv_at(model, ids[0], 0)
    kv = torch.zeros_like(full)
    kv[:, :, :head_len] = full[:, :, :head_len]  # an exact prefix
    reused = torch.zeros(seq, dtype=torch.bool)
    force = torch.zeros(seq, dtype=torch.bool)
    spec = rope_spec(model)
    for (s, e), d in zip(spans, docs, strict=True):
        kv[:, :, s:e] = rerotate_kv(kv_at(model, d, 0), 0, s, spec)
        reused[s:e] = True
        force[s] = True
    return ids, kv, reused, force


def _both(
    model: Any, prefix: int, uncached: slice | None = None, **kw: Any
) -> tuple[fw.BlendForward, fw.BlendForward]:
    ids, kv, reused, force = _inputs(model)
    if uncached is not None:  # rows no cache had: computed in every layer among the reused ones
        reused[uncached] = force[uncached] = False
    common: dict[str, Any] = dict(prefix=prefix, reused=reused, force=force, **kw)
    return (
        fw.blend_forward(model, ids, kv, attention="flex", **common),
        fw.blend_forward(model, ids, kv, attention="mask", **common),
    )


def _assert_same(a: fw.BlendForward, b: fw.BlendForward) -> None:
    assert (a.recomputed, a.computed) == (b.recomputed, b.computed)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        torch.testing.assert_close(la.keys, lb.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(la.values, lb.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("ratio", "prefix", "uncached"),
    [(0.15, 0, None), (0.15, 6, None), (0.5, 6, slice(176, 316)), (0.0, 6, slice(176, 316))],
)
def test_flex_blend_equals_the_mask_path(
    model: Any, ratio: float, prefix: int, uncached: slice | None
) -> None:
    """Ratio 0 (naive reuse) with a document no cache had: every layer's rows are non-contiguous."""
    got, ref = _both(model, prefix, uncached, recompute_ratio=ratio)
    assert got.attention == "flex" and ref.attention == "mask"  # flex really ran the selected layers
    assert 0 < got.computed < 500
    _assert_same(got, ref)


def test_flex_blend_with_gradual_check_layers_equals_the_mask_path(model: Any) -> None:
    got, ref = _both(model, 6, recompute_ratio=0.15, check_layer=[1, 2])
    assert got.attention == "flex"
    _assert_same(got, ref)


def test_ratio_one_with_flex_requested_is_still_a_full_prefill(model: Any) -> None:
    """Every reused row selected: the rows are the contiguous tail, which takes SDPA's causal path."""
    ids, kv, reused, force = _inputs(model)
    out = fw.blend_forward(
        model, ids, kv, prefix=6, reused=reused, force=force, recompute_ratio=1.0, attention="flex"
    )
    assert out.attention == "causal"
    torch.testing.assert_close(out.logits, full_logits(model, ids), rtol=0, atol=1e-4)


def test_auto_keeps_the_mask_off_cuda_and_bad_choices_are_errors(model: Any) -> None:
    ids, kv, reused, _ = _inputs(model)
    out = fw.blend_forward(model, ids, kv, prefix=6, reused=reused, recompute_ratio=0.15)
    assert out.attention == "mask"
    with pytest.raises(BlendError, match="attention must be one of"):
        fw.blend_forward(model, ids, kv, prefix=6, reused=reused, recompute_ratio=0.15, attention="dense")


def test_selections_of_one_block_or_less_take_the_mask_with_a_compiled_kernel() -> None:
    """A compiled kernel is specialised to more than one 128-row block (its guards); a selection of
    one block or less would recompile inside the request, so it gets the dense mask. The eager
    reference serves any size. (Building ``CompiledFlex`` compiles nothing until it is called.)"""
    compiled, eager = flex.CompiledFlex(), flex.kernel(torch.device("cpu"))

    def kind(n: int, seq: int, k: flex.Kernel) -> str:
        rows = torch.linspace(0, seq - 1, n).round().long().unique()  # spread: never a contiguous tail
        assert int(rows.numel()) == n and int(rows[-1]) == seq - 1
        return fw._attention_kind(fw._attn_mask(rows, seq, torch.float32, "sdpa", kernel=k))

    for n in (5, 84, 128):
        assert kind(n, 4000, compiled) == "mask"
        assert kind(n, 4000, eager) == "flex"
    assert kind(129, 4000, compiled) == "flex"
    assert kind(2514, 16440, compiled) == "flex"
    assert not flex.serves(compiled, 200, 128) and flex.serves(compiled, 200, 129)


@pytest.mark.parametrize("checks", [1, [1, 2]])
def test_a_failing_flex_kernel_falls_back_to_the_mask_with_one_warning(
    model: Any, caplog: pytest.LogCaptureFixture, checks: int | list[int]
) -> None:
    """With check layers [1, 2] the first flex layer is a check layer: the selection its probe pass
    made before the failed call must stand (the retry runs the same rows)."""
    calls = 0

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        raise RuntimeError("no kernel for this device")

    flex.set_kernel("cpu", broken)
    ids, kv, reused, force = _inputs(model)
    kw: dict[str, Any] = dict(prefix=6, reused=reused, force=force, recompute_ratio=0.15, check_layer=checks)
    ref = fw.blend_forward(model, ids, kv, attention="mask", **kw)
    with caplog.at_level(logging.WARNING, logger="kvtier.blend.flex"):
        for _ in range(2):
            got = fw.blend_forward(model, ids, kv, attention="flex", **kw)
            assert got.attention == "mask"
            _assert_same(got, ref)
    assert calls == 2  # one failed layer per request, the rest of the request on the mask
    assert "RuntimeError: no kernel for this device" in (flex.disabled() or "")
    warnings = [r for r in caplog.records if "flex attention failed" in r.getMessage()]
    assert len(warnings) == 1


def _sig(scale: float) -> flex.Signature:
    """A CPU signature of its own per test (builds are tracked per signature for the process)."""
    return flex.Signature(
        "cpu", torch.float32, q_heads=4, kv_heads=2, head_dim=16, scale=scale, inference=True
    )


def test_auto_builds_the_kernel_in_the_background_and_serves_the_mask_until_then() -> None:
    sig = _sig(0.2501)
    assert flex.auto_kernel(sig) is None  # this request: the dense mask; the build has started
    assert flex.wait_ready(120)
    assert flex.auto_kernel(sig) is flex.kernel(torch.device("cpu"))  # built: every later request
    assert flex.disabled() is None
    assert (
        flex.auto_kernel(flex.Signature(**{**sig.__dict__, "q_heads": 8})) is None
    )  # another shape: its own build
    assert flex.wait_ready(120)


def test_a_warm_up_that_fails_disables_auto_flex_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("the compiler has no kernel for this shape")

    flex.set_kernel("cpu", broken)
    sig = _sig(0.2502)
    with caplog.at_level(logging.WARNING, logger="kvtier.blend.flex"):
        assert flex.auto_kernel(sig) is None
        assert flex.wait_ready(120)
    assert "no kernel for this shape" in (flex.disabled() or "")
    assert not flex.wanted("auto", torch.device("cuda"), "sdpa")  # auto is the mask from now on
    assert flex.auto_kernel(sig) is None  # failed builds are not retried
    assert len([r for r in caplog.records if "flex attention failed" in r.getMessage()]) == 1


def test_the_sdpa_wrapper_is_transparent_for_other_masks_and_installs_once(model: Any) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ids = random_ids(40, 5, 512)
    flex.install()
    inner = ALL_ATTENTION_FUNCTIONS["sdpa"].kvtier_flex_inner
    ALL_ATTENTION_FUNCTIONS["sdpa"] = inner  # as if someone registered "sdpa" again after kvtier
    try:
        before = full_logits(model, ids)
        flex.install()
        wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
        assert wrapped is not inner and wrapped.kvtier_flex_inner is inner  # wrapped again
        flex.install()
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapped  # idempotent: no wrapper of a wrapper
        torch.testing.assert_close(full_logits(model, ids), before, rtol=0, atol=0)
    finally:
        flex.install()


@pytest.mark.slow
def test_compiled_flex_serves_through_its_second_mode_when_the_first_does_not_build() -> None:
    """``CompiledFlex`` on CPU: in torch 2.13 the dynamic kernel fails to build (C++ codegen), so the
    default mode must take over within the same call; either way the result is the dense one."""
    rows, seq = _rows_cases()[0]
    g = torch.Generator().manual_seed(2)
    n = int(rows.numel())
    q = torch.randn(1, 4, n, 16, generator=g)
    k, v = torch.randn(1, 2, seq, 16, generator=g), torch.randn(1, 2, seq, 16, generator=g)
    kern = flex.CompiledFlex()
    try:
        got = flex.SelectedRows(rows, seq, kern).attend(q, k, v, None)
    except Exception as exc:  # torch 2.11's CPU codegen builds neither mode (the H200 machine)
        assert kern.mode == "automatic" and kern.first_error is not None  # the second mode was tried
        pytest.xfail(f"neither flex compile builds on this CPU with torch {torch.__version__}: {exc!s:.120}")
    mask = torch.arange(seq)[None, :] <= rows[:, None]
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert kern.mode in ("dynamic", "automatic")
    assert (kern.mode == "automatic") == (kern.first_error is not None)
