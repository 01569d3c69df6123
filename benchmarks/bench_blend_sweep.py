"""Blend selection variants on the quality set of ``bench_blend.py`` (SmolLM2-135M, CPU; issue 14).

    PYTHONPATH=src python benchmarks/bench_blend_sweep.py --questions 50 \
        '[{"recompute_ratio": 0.15, "deviation": "k"}, {"recompute_ratio": 0.15, "check_layer": [1, 2, 3]}]'

Each JSON object is a set of ``blend_prefill`` keyword arguments (``recompute_ratio``,
``check_layer``, ``sink_tokens``, ``deviation``, ``segment_sink``). Same prompts, same cached
passages as ``bench_blend.py`` (stored once per distinct ``segment_sink``: after the shared system
head for ``"head"``); per variant: token F1 against the gold answers, exact match and Rouge-L of
the greedy answer against full prefill's, first-token top-1 agreement and KL(full || variant).
No timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).parent))
import bench_blend as bb

from kvtier.blend import SegmentStore, qa
from kvtier.blend.prefill import blend_prefill, segment_kv
from kvtier.integrations import transformers as kvt
from kvtier.models import load_model


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", help="JSON list of blend_prefill keyword-argument objects")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    variants: list[dict[str, Any]] = json.loads(args.variants)
    torch.set_num_threads(1)
    lm = load_model("smollm2")
    model, tok = lm.model, lm.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    docs, items = qa.build(pool=24, per_doc=3, k=4, questions=args.questions, seed=0)
    head = tok.encode(bb.SYSTEM)
    dids = [tok.encode(d) for d in docs]
    eng = bb.engine()
    kvt.bind_engine(eng, model)
    keys = kvt._request_keys(eng, model, torch.tensor([head]), {})
    extras = keys[0] if keys else None
    for sink_opt in sorted({str(v.get("segment_sink", 0)) for v in variants}):
        n_sink = len(head) if sink_opt == "head" else int(sink_opt)
        sink = torch.tensor(head[:n_sink], dtype=torch.long)
        store = SegmentStore(eng, extras, sink)
        for d in dids:  # every passage cached as a segment, computed after the sink (or alone)
            store.store(torch.tensor(d), segment_kv(model, torch.tensor(d), sink))
    prompts = []
    for it in items:  # the same prompts as bench_blend.quality
        ids_l, spans = list(head), []
        for d in it.documents:
            spans.append((len(ids_l), len(ids_l) + len(dids[d])))
            ids_l += dids[d]
        country = it.question.split(" does ")[1].split(" keep")[0]
        ids_l += tok.encode(
            f"Question: {it.question}<|im_end|>\n<|im_start|>assistant\n{country} keeps time by the zone"
        )
        prompts.append((torch.tensor([ids_l]), spans, it.answer))
    refs = []
    for ids, _, _ in prompts:
        logits, cache, _ = bb.full(model, ids)
        refs.append((logits, bb.greedy(model, logits, cache, args.max_new_tokens, eos)))
    full_f1 = statistics.fmean(bb.f1(bb.answer_text(tok, a), g) for (_, a), (_, _, g) in zip(refs, prompts))
    print(json.dumps({"variant": "full", "f1": round(full_f1, 4)}), flush=True)
    for v in variants:
        rows = []
        for (ids, spans, gold), (ref_logits, ref_ans) in zip(prompts, refs):
            cache = DynamicCache(config=model.config)
            o = blend_prefill(model, ids[0], eng, spans, cache, store=False, extras=extras, **v)
            ans = bb.greedy(model, o.logits, cache, args.max_new_tokens, eos)
            rows.append(
                dict(
                    f1=bb.f1(bb.answer_text(tok, ans), gold),
                    em=float(ans == ref_ans),
                    rouge=bb.rouge_l(ref_ans, ans),
                    top1=float(int(o.logits.argmax()) == int(ref_logits.argmax())),
                    kl=bb.kl(ref_logits, o.logits),
                )
            )
        means = {k: round(statistics.fmean(r[k] for r in rows), 4) for k in rows[0]}
        print(json.dumps({"variant": v, **means}), flush=True)


if __name__ == "__main__":
    main()
