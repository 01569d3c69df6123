"""Runs a workload twice on one model — plain transformers, then through kvtier — and keeps
per-request TTFT, hits and the greedy tokens of both runs for comparison.

TTFT is the time from the request to the first token's logits being ready (CUDA synchronised);
kvtier's store of the new KV happens after that point and is reported separately (``store_s``),
as a serving engine would overlap it with decoding.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from kvtier.demo.workloads import Request
from kvtier.engine import CacheEngine
from kvtier.integrations import transformers as kvt

Tick = Callable[[], None]


@dataclass
class RequestResult:
    label: str
    prompt_tokens: int
    ttft_s: float  # median over the request's repeats
    hit_tokens: int = 0
    store_s: float = 0.0
    load_s: float = 0.0  # kvtier lookup + retrieve, part of ttft_s
    split_logits: torch.Tensor | None = None  # uncached prefill split at the same token (reference)
    tokens: list[int] = field(default_factory=list)  # greedy continuation
    first_logits: torch.Tensor | None = None  # [vocab] fp32 on CPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy(model: Any, first_logits: torch.Tensor, cache: Any, n: int) -> list[int]:
    """``n`` greedy tokens: the argmax of ``first_logits``, then ``n-1`` decode steps on ``cache``."""
    tok = first_logits.argmax(dim=-1, keepdim=True).view(1, 1)
    out = [int(tok)]
    for _ in range(n - 1):
        logits = model(input_ids=tok, **{kvt.cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
        tok = logits.argmax(dim=-1, keepdim=True)
        out.append(int(tok))
    return out


@torch.inference_mode()
def plain_prefill(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, Any, float]:
    """The baseline: a full prefill with transformers alone; (last logits, cache, seconds)."""
    device = ids.device
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, **{kvt.cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1).logits[
        :, -1
    ]
    _sync(device)
    return logits, cache, time.perf_counter() - t0


def run_without(model: Any, requests: list[Request], *, gen_tokens: int, tick: Tick | None = None
                ) -> list[RequestResult]:  # fmt: skip
    device = next(model.parameters()).device
    results = []
    for req in requests:
        ids = req.ids.to(device).unsqueeze(0)
        times = []
        for _ in range(req.repeat):
            logits, cache, dt = plain_prefill(model, ids)
            times.append(dt)
        tokens = greedy(model, logits, cache, gen_tokens)
        results.append(RequestResult(req.label, ids.shape[1], statistics.median(times), tokens=tokens,
                                     first_logits=logits[0].float().cpu()))  # fmt: skip
        del cache, logits
        if tick:
            tick()
    return results


@torch.inference_mode()
def split_prefill(model: Any, ids: torch.Tensor, hit: int) -> torch.Tensor:
    """Plain transformers, no kvtier: prefill ``ids[:hit]``, then ``ids[hit:]`` on that cache.

    In low-precision dtypes a split prefill differs from a one-shot prefill by rounding (other
    GEMM shapes); its distance to the one-shot result is the noise floor kvtier is judged by.
    """
    cache = DynamicCache(config=model.config)
    if hit:
        model(input_ids=ids[:, :hit], **{kvt.cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    return model(
        input_ids=ids[:, hit:], **{kvt.cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1
    ).logits[:, -1]


def run_with(model: Any, requests: list[Request], engine: CacheEngine, *, gen_tokens: int,
             model_id: str | None = None, check_split: bool = False, tick: Tick | None = None
             ) -> list[RequestResult]:  # fmt: skip
    device = next(model.parameters()).device
    results = []
    for req in requests:
        ids = req.ids.to(device).unsqueeze(0)
        runs = [kvt.prefill(model, ids, engine, model_id=model_id) for _ in range(req.repeat)]
        r = runs[-1]
        tokens = greedy(model, r.logits, r.cache, gen_tokens)
        results.append(RequestResult(
            req.label, ids.shape[1], statistics.median(x.ttft_s for x in runs), hit_tokens=r.hit_tokens,
            store_s=max(x.store_s for x in runs), load_s=statistics.median(x.load_s for x in runs),
            tokens=tokens, first_logits=r.logits[0].float().cpu(),
        ))  # fmt: skip
        if check_split:
            results[-1].split_logits = split_prefill(model, ids, r.hit_tokens)[0].float().cpu()
        del runs, r
        if tick:
            tick()
    return results


def warm_up(model: Any, vocab_size: int, tokens: int = 256) -> None:
    """One short prefill + decode step so one-time kernel/library set-up is not billed to request 1."""
    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device).remainder(vocab_size).unsqueeze(0)
    logits, cache, _ = plain_prefill(model, ids)
    greedy(model, logits, cache, 2)
