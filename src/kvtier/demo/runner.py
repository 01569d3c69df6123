"""Runs a workload on one model both ways — plain transformers and through kvtier — and keeps
per-request TTFT, hits and the greedy tokens of both for comparison.

``run_interleaved`` (what the demo reports) runs request i both ways before request i+1, the
order alternating from request to request, as ``kvtier bench`` does: on a machine others are
loading, both variants then see the same load over time, so the per-request ratio is fair even
when absolute times drift (issue 22 #12: two sequential runs printed "speedup 0.78x" when the
machine got busy during the second). ``run_without``/``run_with`` run one variant alone (warm-up).

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
    segment_tokens: int | None = None  # rag (blend): passage tokens reused at another position
    recomputed_tokens: int = 0  # rag (blend): of those, recomputed after the check layer


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


def one_without(model: Any, req: Request, *, gen_tokens: int) -> RequestResult:
    """One request with transformers alone (median TTFT over ``req.repeat`` prefills)."""
    ids = req.ids.to(next(model.parameters()).device).unsqueeze(0)
    times = []
    for _ in range(req.repeat):
        logits, cache, dt = plain_prefill(model, ids)
        times.append(dt)
    tokens = greedy(model, logits, cache, gen_tokens)
    return RequestResult(
        req.label, ids.shape[1], statistics.median(times), tokens=tokens, first_logits=logits[0].float().cpu()
    )


def run_without(
    model: Any, requests: list[Request], *, gen_tokens: int, tick: Tick | None = None
) -> list[RequestResult]:
    results = []
    for req in requests:
        results.append(one_without(model, req, gen_tokens=gen_tokens))
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


def one_with(
    model: Any,
    req: Request,
    engine: CacheEngine,
    *,
    gen_tokens: int,
    model_id: str | None = None,
    check_split: bool = False,
    recompute_ratio: float = 0.15,
) -> RequestResult:
    """One request through kvtier (median TTFT over ``req.repeat`` prefills; the last one's hit).
    A request with ``segments`` (rag) is blended at ``recompute_ratio``: approximate by design, so
    its outputs are compared with full prefill, not required to equal it."""
    ids = req.ids.to(next(model.parameters()).device).unsqueeze(0)
    blend: dict[str, Any] = {}
    if req.segments:
        blend = dict(segments=req.segments, recompute_ratio=recompute_ratio)
    runs = [kvt.prefill(model, ids, engine, model_id=model_id, **blend) for _ in range(req.repeat)]
    r = runs[-1]
    tokens = greedy(model, r.logits, r.cache, gen_tokens)
    out = RequestResult(
        req.label,
        ids.shape[1],
        statistics.median(x.ttft_s for x in runs),
        hit_tokens=r.hit_tokens,
        store_s=max(x.store_s for x in runs),
        load_s=statistics.median(x.load_s for x in runs),
        tokens=tokens,
        first_logits=r.logits[0].float().cpu(),
        segment_tokens=r.segment_tokens if blend else None,
        recomputed_tokens=r.recomputed_tokens,
    )
    if check_split and not blend:
        out.split_logits = split_prefill(model, ids, r.hit_tokens)[0].float().cpu()
    return out


def run_with(
    model: Any,
    requests: list[Request],
    engine: CacheEngine,
    *,
    gen_tokens: int,
    model_id: str | None = None,
    check_split: bool = False,
    tick: Tick | None = None,
    recompute_ratio: float = 0.15,
) -> list[RequestResult]:
    results = []
    for req in requests:
        results.append(
            one_with(
                model,
                req,
                engine,
                gen_tokens=gen_tokens,
                model_id=model_id,
                check_split=check_split,
                recompute_ratio=recompute_ratio,
            )
        )
        if tick:
            tick()
    return results


def run_interleaved(
    model: Any,
    requests: list[Request],
    engine: CacheEngine,
    *,
    gen_tokens: int,
    model_id: str | None = None,
    check_split: bool = False,
    tick: Tick | None = None,
    recompute_ratio: float = 0.15,
) -> tuple[list[RequestResult], list[RequestResult]]:
    """Both variants, request by request: ``(without, with_)``, in request order.

    Even requests go without kvtier first, odd ones with it first, so neither variant is always
    the one that runs on a cold CPU cache or right after the other's allocations. The variants
    share no state (plain prefills never touch ``engine``), so the order changes no result.
    """
    without: list[RequestResult] = []
    with_: list[RequestResult] = []
    for i, req in enumerate(requests):
        for variant in ("without", "with") if i % 2 == 0 else ("with", "without"):
            if variant == "without":
                without.append(one_without(model, req, gen_tokens=gen_tokens))
            else:
                with_.append(
                    one_with(
                        model,
                        req,
                        engine,
                        gen_tokens=gen_tokens,
                        model_id=model_id,
                        check_split=check_split,
                        recompute_ratio=recompute_ratio,
                    )
                )
            if tick:
                tick()
    return without, with_


def warm_up(model: Any, vocab_size: int, tokens: int = 256) -> None:
    """One short prefill + decode step so one-time kernel/library set-up is not billed to request 1."""
    device = next(model.parameters()).device
    ids = torch.arange(tokens, device=device).remainder(vocab_size).unsqueeze(0)
    logits, cache, _ = plain_prefill(model, ids)
    greedy(model, logits, cache, 2)
