"""Load or recompute by measured cost (issue 21.6): TTFT with a tier slower than recompute.

A random Llama (built in code, CPU) prefills prompts through ``kvtier.integrations.transformers``
with one cache tier wrapped in the fault injector's latency (``FaultTier``, a slow store: every
call, lookup or read, costs ``latency``), calibrated in the same run to ``--slow-factor`` times
the model's own prefill of a prompt, so loading is slower than recomputing. Variants, run
interleaved request by request so all see the same load:

* ``without``: the model alone (no kvtier);
* ``cost-on``: kvtier with ``cost.enabled`` (the default): it learns the tier is slow and
  recomputes (goal: TTFT <= 1.02x ``without``);
* ``cost-off``: kvtier loading whatever it has (what every cache does today);
* ``fast-on``: kvtier, cost on, the same tier without latency (the decision must keep the win).

Each prompt is sent twice per variant (a miss that stores, then a hit); TTFT of the hits is
reported, the first ``--warmup`` hits excluded (where the engine learns the tier's speed) and
also shown. ``--json`` writes the figures. ``run()`` returns the rows for ``bench_all.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from kvtier import CacheEngine, Config
from kvtier.chunk import Chunk
from kvtier.integrations.transformers import prefill
from kvtier.tiers.cpu import CPUTier
from kvtier.tiers.fault import FaultSpec, FaultTier


def _model(layers: int, hidden: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.inference_mode()
def _plain_ttft(model: Any, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


class _SlowReads(FaultTier):
    """The fault wrapper's latency on lookups and reads only: stores (after TTFT, not measured)
    would only make the benchmark's wall time long."""

    def put(self, key: bytes, chunk: Chunk) -> bool:
        return self.inner.put(key, chunk)


def _engine(latency_s: float, cost: bool, chunk_tokens: int) -> CacheEngine:
    cfg = Config.load(env={}, chunk_tokens=chunk_tokens, cost={"enabled": cost})
    tier = _SlowReads(CPUTier(2 * 1024**3, pin_memory=False), FaultSpec(latency_s=latency_s))
    return CacheEngine(cfg, tiers=[tier])


def run(
    prompts: int = 24,
    tokens: int = 512,
    layers: int = 4,
    hidden: int = 256,
    slow_factor: float = 1.5,
    chunk_tokens: int = 64,
    warmup: int = 2,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = _model(layers, hidden)
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 4096, (1, tokens), generator=gen) for _ in range(prompts)]
    for p in ids[:3]:
        _plain_ttft(model, p)  # warm the kernels
    base = statistics.median(_plain_ttft(model, p) for p in ids[:5])
    latency = slow_factor * base
    variants = {
        "cost-on": _engine(latency, True, chunk_tokens),
        "cost-off": _engine(latency, False, chunk_tokens),
        "fast-on": _engine(0.0, True, chunk_tokens),
    }
    ttft: dict[str, list[float]] = {"without": [], **{v: [] for v in variants}}
    hits: dict[str, int] = {v: 0 for v in variants}
    for p in ids:
        for eng in variants.values():  # the miss: prefill and store
            prefill(model, p, eng, model_id="bench-load-cost")
        order = ["without", *variants]
        for name in order:  # the hit (or the recompute cost-on chooses)
            if name == "without":
                ttft[name].append(_plain_ttft(model, p))
                continue
            r = prefill(model, p, variants[name], model_id="bench-load-cost", store=False)
            ttft[name].append(r.ttft_s)
            hits[name] += r.hit_tokens
    out: dict[str, Any] = {
        "prompt_tokens": tokens,
        "prompts": prompts,
        "model": f"random llama {layers} layers x {hidden}",
        "prefill_median_s": base,
        "tier_latency_s": latency,
        "warmup": warmup,
        "variants": {},
    }
    w = ttft["without"]
    for name, xs in ttft.items():
        steady = xs[warmup:]
        ratio = statistics.median(a / b for a, b in zip(steady, w[warmup:]))
        out["variants"][name] = {
            "ttft_median_ms": 1e3 * statistics.median(steady),
            "ttft_mean_ms": 1e3 * statistics.mean(steady),
            "ttft_mean_all_ms": 1e3 * statistics.mean(xs),
            "paired_ratio_vs_without": ratio,
            "mean_ratio_vs_without": statistics.mean(steady) / statistics.mean(w[warmup:]),
            "cached_tokens_loaded": hits.get(name, 0),
        }
    for name, eng in variants.items():
        s = eng.stats()
        out["variants"][name]["cost_skipped_tiers"] = s.cost_skipped_tiers
        out["variants"][name]["cost_declined_tokens"] = s.cost_declined_tokens
        eng.close()
    return out


def show(res: dict[str, Any]) -> str:
    lines = [
        f"model {res['model']}, {res['prompts']} prompts x {res['prompt_tokens']} tokens; "
        f"prefill median {1e3 * res['prefill_median_s']:.1f} ms; slow tier latency "
        f"{1e3 * res['tier_latency_s']:.1f} ms per call; first {res['warmup']} hits excluded",
        "| variant | TTFT median ms | mean ms | mean incl. warm-up ms | paired ratio vs without "
        "| mean ratio | cached tokens loaded |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in res["variants"].items():
        lines.append(
            f"| {name} | {v['ttft_median_ms']:.1f} | {v['ttft_mean_ms']:.1f} | {v['ttft_mean_all_ms']:.1f} "
            f"| {v['paired_ratio_vs_without']:.3f} | {v['mean_ratio_vs_without']:.3f} | {v['cached_tokens_loaded']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--slow-factor", type=float, default=1.5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    res = run(a.prompts, a.tokens, a.layers, a.hidden, a.slow_factor, warmup=a.warmup)
    print(show(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
