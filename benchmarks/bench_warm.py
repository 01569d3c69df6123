"""``kvtier warm`` on SmolLM2-135M (CPU): warm a corpus into a disk tier, then serve it.

1. ``kvtier warm corpus.jsonl --disk-path DIR`` (in process, prefix mode): time, tokens, bytes.
2. The same command again: every document is found stored and skipped (resume cost).
3. For each document, a request = the document + a question, in a fresh engine on that disk (what
   a serving process started after the warm-up sees) vs a plain prefill (no cache): hit tokens and
   the paired TTFT ratio (median of per-request cold / warm; same process, interleaved).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_warm.py [--docs 16 --sentences 24]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvtier import CacheEngine, Config
from kvtier.cli import main
from kvtier.demo.corpus import paragraph, question
from kvtier.integrations import transformers as kvt
from kvtier.models import load_model


def run(docs: int, sentences: int, chunk: int) -> dict[str, object]:
    rng = random.Random(0)
    texts = [paragraph(rng, sentences) for _ in range(docs)]
    tmp = Path(tempfile.mkdtemp(prefix="kvtier-bench-warm-"))
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = [
        "warm",
        str(corpus),
        "--disk-path",
        str(tmp / "kv"),
        "--chunk-tokens",
        str(chunk),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    assert main([*argv, "--json", str(tmp / "first.json")]) == 0
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert main([*argv, "--json", str(tmp / "again.json")]) == 0
    again_s = time.perf_counter() - t0
    first = json.loads((tmp / "first.json").read_text())
    again = json.loads((tmp / "again.json").read_text())

    lm = load_model("smollm2")
    torch.set_num_threads(1)
    engine = CacheEngine(
        Config.load(
            env={},
            chunk_tokens=chunk,
            cpu__max_bytes="256MiB",
            disk__enabled=True,
            disk__path=str(tmp / "kv"),
        )
    )
    cold_engine = CacheEngine(Config.load(env={}, chunk_tokens=chunk, cpu__max_bytes="64MiB"))
    ratios, hits, total = [], 0, 0
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text)["input_ids"] + lm.tokenizer(" " + question(rng))["input_ids"]
        x = torch.tensor([ids])
        order = (0, 1) if i % 2 == 0 else (1, 0)
        t = [0.0, 0.0]
        for v in order:
            r = kvt.prefill(lm.model, x, engine if v else cold_engine, model_id=lm.model_id, store=False)
            t[v] = r.ttft_s
            if v:
                hits += r.hit_tokens
        total += len(ids)
        ratios.append(t[0] / t[1])
    engine.close()
    cold_engine.close()
    return {
        "docs": docs,
        "tokens": first["tokens"],
        "first_s": round(first_s, 2),
        "warm_tokens_per_s": round(first["tokens"] / first["seconds"]),
        "disk": first["tiers"]["disk"],
        "again_s": round(again_s, 2),
        "again_skipped": again["skipped"],
        "request_tokens": total,
        "hit_tokens": hits,
        "paired_ttft_speedup": round(statistics.median(ratios), 2),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--sentences", type=int, default=24)
    ap.add_argument("--chunk-tokens", type=int, default=64)
    a = ap.parse_args()
    print(json.dumps(run(a.docs, a.sentences, a.chunk_tokens), indent=2))
