"""Blending with real SmolLM2-135M weights on the RAG QA set (fp32, CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tests.integrations.helpers import full_logits, make_engine

from kvtier.blend import qa
from kvtier.integrations import transformers as kvt
from kvtier.models import LoadedModel

pytest.importorskip("transformers")

SYSTEM = "<|im_start|>system\nYou answer questions from the passages.<|im_end|>\n<|im_start|>user\n"


def _prompt(
    tok: Any, docs: list[list[int]], order: tuple[int, ...], question: str
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    ids, spans = tok.encode(SYSTEM), []
    for d in order:
        spans.append((len(ids), len(ids) + len(docs[d])))
        ids += docs[d]
    ids += tok.encode(f"Question: {question}<|im_end|>\n<|im_start|>assistant\n")
    return torch.tensor([ids]), spans


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())


def test_smollm2_ratio_one_is_full_prefill_and_blend_beats_naive(smollm2: LoadedModel) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    texts, items = qa.build(pool=8, per_doc=2, k=3, questions=3, seed=1)
    docs = [tok.encode(t) for t in texts]
    with make_engine() as eng:
        first = items[0]
        ids, spans = _prompt(tok, docs, first.documents, first.question)
        kvt.prefill(model, ids, eng, segments=spans)  # stores the three documents as segments
        ids, spans = _prompt(tok, docs, first.documents[::-1], first.question)  # another order
        r = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=1.0, store=False)
        prefix = r.hit_tokens - r.segment_tokens  # the documents share their first token "Passage":
        assert prefix > spans[0][0]  # the prefix chunk ends inside the first document (it used to drop it)
        assert r.segment_tokens == sum(len(docs[d]) for d in first.documents) - (prefix - spans[0][0])
        torch.testing.assert_close(r.logits, full_logits(model, ids), rtol=0, atol=1e-4)
        out = kvt.generate(
            model,
            ids,
            eng,
            segments=spans,
            recompute_ratio=1.0,
            store=False,
            max_new_tokens=5,
            do_sample=False,
        )
        assert out.equal(model.generate(ids, max_new_tokens=5, do_sample=False))
        # Quality: with every document cached, 15 % recompute is closer to full prefill than naive reuse.
        for it in items:
            ids, spans = _prompt(tok, docs, it.documents, it.question)
            kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.0)  # stores the missing documents
        kl_blend, kl_naive = [], []
        for it in items:
            ids, spans = _prompt(tok, docs, it.documents[1:] + it.documents[:1], it.question)
            ref = full_logits(model, ids)
            b = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.15, store=False)
            n = kvt.prefill(model, ids, eng, segments=spans, recompute_ratio=0.0, store=False)
            assert b.segment_tokens == n.segment_tokens > 0
            kl_blend.append(_kl(ref, b.logits))
            kl_naive.append(_kl(ref, n.logits))
        assert sum(kl_blend) < sum(kl_naive)
