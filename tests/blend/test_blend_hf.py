"""Blending through ``kvt.prefill``/``kvt.generate`` on tiny random models (fp32, real forward passes)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.blend.helpers import rag_prompt, tiny_model
from tests.integrations.helpers import full_logits, make_engine, random_ids

from kvtier import CacheEngine, Config
from kvtier.blend import BlendError, SegmentStore
from kvtier.chunk import Chunk
from kvtier.errors import KVTierError
from kvtier.integrations import transformers as kvt
from kvtier.models import load_model
from kvtier.tiers.cpu import CPUTier

pytest.importorskip("transformers")

SPECS = ("random:llama-tiny", "random:qwen2-tiny", "random:mistral-tiny")


@pytest.fixture(scope="module", params=SPECS)
def model(request: pytest.FixtureRequest) -> Any:
    return load_model(request.param).model


def _parts(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    head = random_ids(9, seed)[0]
    docs = [random_ids(n, seed + 1 + i)[0] for i, n in enumerate((40, 33, 51))]
    return head, docs, random_ids(7, seed + 9)[0]


def _store_docs(
    model: Any, engine: CacheEngine, head: torch.Tensor, docs: list[torch.Tensor], q: torch.Tensor
) -> None:
    ids, spans = rag_prompt(head, docs, q)
    r = kvt.prefill(model, ids, engine, segments=spans, recompute_ratio=0.15)
    assert r.segment_tokens == 0  # cold: nothing to reuse yet, every segment stored on its own


def test_ratio_one_reproduces_full_prefill_in_another_order(model: Any) -> None:
    head, docs, q = _parts()
    with make_engine() as eng:
        _store_docs(model, eng, head, docs, q)
        ids, spans = rag_prompt(head, docs[::-1], q)  # documents in another order
        r = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=1.0, store=False)
        n_docs = sum(int(d.numel()) for d in docs)
        assert r.segment_tokens == n_docs and r.recomputed_tokens == n_docs
        torch.testing.assert_close(r.logits, full_logits(model, ids), rtol=0, atol=1e-4)
        out = kvt.generate(
            model,
            ids,
            eng,
            segments=spans,
            recompute_ratio=1.0,
            store=False,
            max_new_tokens=6,
            do_sample=False,
        )
        assert out.equal(model.generate(ids, max_new_tokens=6, do_sample=False))


def test_ratio_zero_is_naive_reuse_and_partial_counts(model: Any) -> None:
    head, docs, q = _parts(1)
    with make_engine() as eng:
        _store_docs(model, eng, head, docs, q)
        ids, spans = rag_prompt(head, [docs[1], docs[2], docs[0]], q)
        ref = full_logits(model, ids)
        naive = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.0, store=False)
        n_docs = sum(int(d.numel()) for d in docs)
        assert naive.segment_tokens == n_docs and naive.recomputed_tokens == 0
        assert (naive.logits - ref).abs().max() > 1e-3  # cross-attention is missing: not a full prefill
        part = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.3, store=False)
        assert part.recomputed_tokens == round(0.3 * n_docs)
        assert part.hit_tokens == n_docs  # no prefix chunk matches the new order's first document


def test_first_document_at_position_zero_order_kept_is_exact(model: Any) -> None:
    """The same prompt again: prefix chunks cover it exactly; segments are not needed."""
    head, docs, q = _parts(2)
    with make_engine() as eng:
        ids, spans = rag_prompt(head, docs, q)
        kvt.prefill(model, ids, eng, segments=spans)
        r = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.0, store=False)
        assert (
            r.hit_tokens
            == min(eng.lookup(ids[0], extras=_extras(eng, model, ids)), ids.shape[1] - 1)
            > spans[-1][0]
        )
        assert r.segment_tokens == 0  # every segment starts inside the exact prefix
        torch.testing.assert_close(r.logits, full_logits(model, ids), rtol=0, atol=1e-4)


def test_prefix_chunks_never_receive_blended_kv() -> None:
    """Blended rows are approximate: storing them as prefix chunks would make a later *plain*
    prefix hit differ from a full prefill. Only the rows before the first reused one are stored."""
    model = load_model("random:llama-tiny").model
    head, docs, q = _parts(3)
    with make_engine() as eng:
        _store_docs(model, eng, head, docs, q)
        ids, spans = rag_prompt(head, docs[::-1], q)
        kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.15)
        plain = kvt.prefill(model, ids, eng, store=False)
        assert plain.hit_tokens <= spans[0][0]
        torch.testing.assert_close(plain.logits, full_logits(model, ids), rtol=0, atol=1e-4)


def _extras(eng: CacheEngine, model: Any, ids: torch.Tensor) -> Any:
    """The key extras (adapter identity) the integration folds into this model's keys."""
    keys = kvt._request_keys(eng, model, ids, {})
    assert keys is not None
    return keys[0]


def test_segment_and_prefix_domains_are_separate() -> None:
    model = load_model("random:llama-tiny").model
    doc = random_ids(48, 5)
    with make_engine() as eng:
        kvt.prefill(model, doc, eng)  # the document as a prompt of its own: prefix chunks
        ex = _extras(eng, model, doc)
        seg = SegmentStore(eng, ex)
        assert eng.lookup(doc[0], extras=ex) == 48 and seg.lookup(doc[0]) == 0
        assert {k.digest for k in seg.keys(doc[0])}.isdisjoint(k.digest for k in eng.keys(doc[0], ex))
    with make_engine() as eng:
        q = random_ids(5, 6)[0]
        ids, spans = rag_prompt(random_ids(3, 7)[0], [doc[0]], q)
        kvt.prefill(model, ids, eng, segments=spans)
        ex = _extras(eng, model, doc)
        assert SegmentStore(eng, ex).lookup(doc[0]) == 48 and eng.lookup(doc[0], extras=ex) == 0


def test_separator_splits_like_explicit_segments() -> None:
    model = load_model("random:llama-tiny").model
    head, docs, q = _parts(4)
    sep = torch.tensor([11, 12, 13])
    with make_engine() as eng:
        pieces = [head, sep, docs[0], sep, docs[1], sep, q]
        kvt.prefill(model, torch.cat(pieces)[None], eng, separator=sep.tolist())
        swapped = torch.cat([head, sep, docs[1], sep, docs[0], sep, q])[None]
        r = kvt.prefill(model, swapped, eng, separator=[11, 12, 13], recompute_ratio=1.0, store=False)
        # every piece but the last is a segment: the head (at position 0 again) and both documents
        assert r.segment_tokens == head.numel() + docs[0].numel() + docs[1].numel()
        torch.testing.assert_close(r.logits, full_logits(model, swapped), rtol=0, atol=1e-4)


class _ReadFailingTier(CPUTier):
    """A CPU tier whose reads fail like a dead remote (OSError): the manager must turn it into a miss."""

    fail = False

    def prefix_contains(self, keys: Sequence[bytes]) -> int:
        if self.fail:
            raise OSError("tier down")
        return super().prefix_contains(keys)

    def get(self, key: bytes) -> Chunk | None:
        if self.fail:
            raise OSError("tier down")
        return super().get(key)

    def batched_get(self, keys: Sequence[bytes]) -> list[Chunk | None]:
        if self.fail:
            raise OSError("tier down")
        return super().batched_get(keys)


def test_failing_tier_is_a_miss_that_computes_the_segments() -> None:
    model = load_model("random:llama-tiny").model
    head, docs, q = _parts(5)
    tier = _ReadFailingTier(64 << 20, pin_memory=False)
    cfg = Config.load(env={}, chunk_tokens=16, cpu__pin_memory="no")
    with CacheEngine(cfg, tiers=[tier]) as eng:
        _store_docs(model, eng, head, docs, q)
        tier.fail = True
        ids, spans = rag_prompt(head, docs[::-1], q)
        r = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.15)
        assert r.segment_tokens == 0 and r.hit_tokens == 0
        torch.testing.assert_close(r.logits, full_logits(model, ids), rtol=0, atol=1e-4)


def test_bad_input_is_a_clear_error() -> None:
    model = load_model("random:llama-tiny").model
    ids = random_ids(30)
    with make_engine() as eng:
        with pytest.raises(BlendError, match="overlap"):
            kvt.prefill(model, ids, eng, segments=[(0, 10), (5, 12)])
        with pytest.raises(BlendError, match="outside the prompt"):
            kvt.generate(model, ids, eng, segments=[(20, 40)], max_new_tokens=2)
        with pytest.raises(BlendError, match="one prompt row"):
            kvt.prefill(model, torch.cat([ids, ids]), eng, segments=[(0, 10)])
        with pytest.raises(BlendError, match="not both"):
            kvt.prefill(model, ids, eng, segments=[(0, 10)], separator=[1])
        with pytest.raises(BlendError, match="recompute_ratio"):
            kvt.prefill(model, ids, eng, segments=[(0, 10)], recompute_ratio=-0.1)


def test_models_that_cannot_be_blended_are_refused() -> None:
    ids = random_ids(30, vocab=512)
    dyn = tiny_model("llama", {"rope_type": "dynamic", "factor": 2.0})
    with make_engine() as eng, pytest.raises(BlendError, match="dynamic"):
        kvt.prefill(dyn, ids, eng, segments=[(2, 10)])
    windowed = tiny_model("mistral", sliding_window=16)
    # the integration refuses a windowed model before blending (IntegrationError); blend would too
    with make_engine() as eng, pytest.raises(KVTierError, match="sliding"):
        kvt.prefill(windowed, ids, eng, segments=[(2, 10)])


STORE_SCRIPT = """
import sys, torch
from kvtier import CacheEngine, Config
from kvtier.integrations import transformers as kvt
from kvtier.models import load_model
from tests.blend.helpers import rag_prompt
from tests.blend.test_blend_hf import _parts
cfg = Config.load(env={}, chunk_tokens=16, cpu__pin_memory="no", disk__enabled=True, disk__path=sys.argv[1])
model = load_model("random:llama-tiny").model
head, docs, q = _parts(6)
with CacheEngine(cfg) as eng:
    ids, spans = rag_prompt(head, docs, q)
    kvt.prefill(model, ids, eng, segments=spans)
    assert eng.flush(60)
"""


def test_segments_stored_by_one_process_blend_in_another(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{root / 'src'}:{root}", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", STORE_SCRIPT, str(tmp_path / "d")], check=True, cwd=root, env=env, timeout=300
    )
    model = load_model("random:llama-tiny").model
    head, docs, q = _parts(6)
    cfg = Config.load(
        env={}, chunk_tokens=16, cpu__pin_memory="no", disk__enabled=True, disk__path=str(tmp_path / "d")
    )
    with CacheEngine(cfg) as eng:
        ids, spans = rag_prompt(head, docs[::-1], q)
        r = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=1.0, store=False)
        assert r.segment_tokens == sum(int(d.numel()) for d in docs)
        torch.testing.assert_close(r.logits, full_logits(model, ids), rtol=0, atol=1e-4)


def test_segment_keys_hold_the_adapter_and_refuse_unpositioned_inputs() -> None:
    from kvtier.keys import KeyExtras

    toks = random_ids(40)[0]
    with make_engine() as eng:
        eng.bind_model(2, 2, 8, torch.float32)
        a = SegmentStore(eng, KeyExtras(adapter="lora-a")).keys(toks)
        b = SegmentStore(eng, KeyExtras(adapter="lora-b")).keys(toks)
        assert {k.digest for k in a}.isdisjoint(k.digest for k in b)
        with pytest.raises(BlendError, match="extra model inputs"):
            SegmentStore(eng, KeyExtras(inputs="pixels"))
