"""Selection inside ``blend_forward``: forced segment starts, gradual check layers, deviation kinds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.blend.helpers import kv_at, rag_prompt, tiny_model
from tests.integrations.helpers import full_logits, random_ids

from kvtier.blend import BlendError
from kvtier.blend import forward as fw
from kvtier.blend.rope import rerotate_kv, rope_spec


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_model("llama", num_hidden_layers=4)


def _blend_inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """A prompt of 3 documents whose KV (computed alone, re-rotated) fills their rows."""
    head, q = random_ids(6, 1, 512)[0], random_ids(5, 2, 512)[0]
    docs = [random_ids(n, 3 + i, 512)[0] for i, n in enumerate((30, 25, 35))]
    ids, spans = rag_prompt(head, docs, q)
    seq = int(ids.shape[1])
    kv0 = kv_at(model, ids[0, :1], 0)
    kv = torch.zeros((kv0.shape[0], 2, seq, *kv0.shape[3:]))
    reused = torch.zeros(seq, dtype=torch.bool)
    spec = rope_spec(model)
    for (s, e), d in zip(spans, docs, strict=True):
        kv[:, :, s:e] = rerotate_kv(kv_at(model, d, 0), 0, s, spec)
        reused[s:e] = True
    return ids, kv, reused, spans


def _selected(model: Any, ids: torch.Tensor, kv: torch.Tensor, reused: torch.Tensor, **kw: Any) -> set[int]:
    """Positions whose last-layer KV changed from the cached rows (i.e. were recomputed)."""
    out = fw.blend_forward(model, ids, kv, prefix=0, reused=reused, **kw)
    k_last = out.cache.layers[-1].keys[0].transpose(0, 1)  # [S, H, D]
    changed = (k_last - kv[-1, 0]).abs().amax(dim=(1, 2)) > 0
    return {int(i) for i in (changed & reused).nonzero().squeeze(1)}


def test_forced_segment_starts_are_recomputed_within_the_budget(model: Any) -> None:
    ids, kv, reused, spans = _blend_inputs(model)
    n_reused = int(reused.sum())
    force = torch.zeros_like(reused)
    starts = [s for s, _ in spans]
    force[starts] = True
    out = fw.blend_forward(model, ids, kv, prefix=0, reused=reused, recompute_ratio=0.1, force=force)
    assert out.recomputed == round(0.1 * n_reused)  # forced rows come out of the same budget
    got = _selected(model, ids, kv, reused, recompute_ratio=0.1, force=force)
    assert set(starts) <= got and len(got) == out.recomputed
    # a budget smaller than the forced rows keeps the earliest forced ones only
    tiny = fw.blend_forward(model, ids, kv, prefix=0, reused=reused, recompute_ratio=0.02, force=force)
    assert tiny.recomputed == round(0.02 * n_reused) < len(starts)


def test_gradual_check_layers_narrow_to_the_ratio_and_ratio_one_stays_exact(model: Any) -> None:
    ids, kv, reused, _ = _blend_inputs(model)
    n_reused = int(reused.sum())
    assert fw._stage_ratios(0.15, 3) == pytest.approx([0.45, 0.30, 0.15])
    out = fw.blend_forward(model, ids, kv, prefix=0, reused=reused, recompute_ratio=0.15, check_layer=[1, 2])
    assert out.recomputed == round(0.15 * n_reused)
    full = fw.blend_forward(model, ids, kv, prefix=0, reused=reused, recompute_ratio=1.0, check_layer=[1, 2])
    torch.testing.assert_close(full.logits, full_logits(model, ids), rtol=0, atol=1e-4)


def _mlp_rows(model: Any) -> tuple[list[int], list[Any]]:
    """Rows each layer's MLP computes in the next forward (hooks: remove them after)."""
    seen: list[int] = []
    hooks = [
        layer.mlp.register_forward_hook(lambda _m, args, _out: seen.append(int(args[0].shape[1])))
        for layer in model.model.layers
    ]
    return seen, hooks


@pytest.mark.parametrize("check", [1, [1, 2]])
def test_check_layers_run_attention_and_mlp_for_the_rows_they_keep_only(model: Any, check: Any) -> None:
    ids, kv, reused, _ = _blend_inputs(model)
    seq, n_reused = int(ids.shape[1]), int(reused.sum())
    fixed = seq - n_reused  # head, question: computed in every layer
    seen, hooks = _mlp_rows(model)
    try:
        out = fw.blend_forward(
            model, ids, kv, prefix=0, reused=reused, recompute_ratio=0.2, check_layer=check
        )
    finally:
        for h in hooks:
            h.remove()
    kept = fixed + out.recomputed
    if check == 1:  # layer 0 all rows; layer 1 (the check) already only the selection
        assert seen == [seq, kept, kept, kept]
    else:  # gradual: the first check keeps 2 x 20 %, the second 20 %
        assert seen == [seq, fixed + round(0.4 * n_reused), kept, kept]
    # the first check layer's K/V are fresh for every row: layers up to it equal a full prefill
    ref = kv_at(model, ids[0], 0)
    first = check if isinstance(check, int) else min(check)
    for i in range(first + 1):
        torch.testing.assert_close(out.cache.layers[i].keys[0].transpose(0, 1), ref[i, 0], rtol=0, atol=1e-5)
        torch.testing.assert_close(
            out.cache.layers[i].values[0].transpose(0, 1), ref[i, 1], rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("kind", ["k", "v", "kv"])
def test_deviation_kinds_pick_the_budget(model: Any, kind: str) -> None:
    ids, kv, reused, _ = _blend_inputs(model)
    got = _selected(model, ids, kv, reused, recompute_ratio=0.2, deviation=kind)
    assert len(got) == round(0.2 * int(reused.sum()))


def test_bad_selection_arguments_are_clear_errors(model: Any) -> None:
    ids, kv, reused, _ = _blend_inputs(model)
    with pytest.raises(BlendError, match="deviation must be one of"):
        fw.blend_forward(model, ids, kv, prefix=0, reused=reused, recompute_ratio=0.2, deviation="q")
    with pytest.raises(BlendError, match="at least one layer"):
        fw.blend_forward(model, ids, kv, prefix=0, reused=reused, recompute_ratio=0.2, check_layer=[])
