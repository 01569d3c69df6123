"""Quality of lossy KV codecs against raw cached KV, on a real model and real text.

For each window of ``prefix + cont`` tokens of held-out text: prefill ``prefix`` once, pass its
KV through a codec exactly as the engine stores it (``chunk_tokens`` chunks, the tail partial),
then run the ``cont`` tokens on top of that KV. Compared with the same continuation on the raw
KV: perplexity of the continuation, teacher-forced greedy agreement (argmax equal at each
continuation position) and the KL divergence of the first continuation position.

The text is Python's own documentation (``pydoc_data.topics``, ~460 kB of English prose and
code, on every Python install): real text, offline, and nothing here was tuned on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.bench.workloads import WorkloadError
from kvtier.models import cache_kwarg, output_cache
from kvtier.serde.kvcodec import get_kv_codec

REFERENCE = "none"


def held_out_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@dataclass(frozen=True)
class WindowScore:
    """One codec's scores on one window: the unit the resumable log stores (kv_quality_log)."""

    nll_sum: float
    n_tokens: int
    agree: int
    first_agree: int
    first_kl: float


@dataclass
class CodecQuality:
    name: str
    nll_sum: float = 0.0
    n_tokens: int = 0
    agree: int = 0
    first_kl_sum: float = 0.0
    n_windows: int = 0
    first_agree: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, w: WindowScore) -> None:
        self.nll_sum += w.nll_sum
        self.n_tokens += w.n_tokens
        self.agree += w.agree
        self.first_agree += w.first_agree
        self.first_kl_sum += w.first_kl
        self.n_windows += 1

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(self.n_tokens, 1))

    @property
    def agreement(self) -> float:
        return self.agree / max(self.n_tokens, 1)

    @property
    def first_kl(self) -> float:
        return self.first_kl_sum / max(self.n_windows, 1)


def roundtrip(kv: torch.Tensor, codec_name: str, chunk_tokens: int) -> torch.Tensor:
    """``kv [L, 2, T, H, D]`` after storing and reading back through ``codec_name``
    (``"bf16"``: cast to bfloat16 and back, the reference point of serving engines)."""
    if codec_name == "bf16":
        return kv.to(torch.bfloat16).to(kv.dtype)
    codec = get_kv_codec(codec_name, kv.dtype)
    if codec is None:
        return kv
    out = torch.empty_like(kv)
    for s in range(0, kv.shape[2], chunk_tokens):
        part = kv[:, :, s : s + chunk_tokens]
        out[:, :, s : s + chunk_tokens] = codec.decode(codec.encode(part), tuple(part.shape), kv.dtype)
    return out


def _kv_of(cache: Any) -> torch.Tensor:
    return torch.stack([torch.stack([lay.keys[0], lay.values[0]]).transpose(1, 2) for lay in cache.layers])


def _cache_of(model: Any, kv: torch.Tensor) -> Any:
    """A DynamicCache holding ``kv``: ``[L, 2, T, H, D]`` (batch 1) or ``[B, L, 2, T, H, D]``."""
    from transformers import DynamicCache

    if kv.dim() == 5:
        kv = kv[None]
    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[1]):
        cache.update(kv[:, i, 0].transpose(1, 2).contiguous(), kv[:, i, 1].transpose(1, 2).contiguous(), i)
    return cache


def _scores(logits: torch.Tensor, ref_logits: torch.Tensor, target: torch.Tensor) -> WindowScore:
    """Scores of one continuation's ``logits [cont, V]`` (fp32) against the raw KV's."""
    logp = torch.log_softmax(logits, -1)
    ref_logp0 = torch.log_softmax(ref_logits[0], -1)
    return WindowScore(
        nll_sum=float(-logp[:-1].gather(1, target[:, None]).sum()),
        n_tokens=int(target.numel()),
        agree=int((logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).sum()),
        first_agree=int(logits[0].argmax() == ref_logits[0].argmax()),
        first_kl=float((ref_logp0.exp() * (ref_logp0 - logp[0])).sum()),
    )


@torch.inference_mode()
def score_window(
    model: Any,
    seq: torch.Tensor,
    codecs: list[str],
    *,
    prefix: int,
    chunk_tokens: int = 256,
    batched: bool = True,
) -> dict[str, WindowScore]:
    """Scores of raw (``"none"``) and each codec on one window ``seq`` (1-D, ``prefix + cont`` ids).

    The prefix is prefilled once (logits of its last position only: the rest are unused) and every
    codec's KV is derived from that one raw KV. ``batched``: all continuations run in ONE forward
    (batch row = codec, the same continuation tokens, no padding), equal to one forward per codec
    within fp32 rounding (tested); ``batched=False`` is that reference.
    """
    names = [REFERENCE, *(c for c in codecs if c != REFERENCE)]
    out = model(seq[None, :prefix], use_cache=True, logits_to_keep=1)
    kv = _kv_of(output_cache(out))
    cont = seq[None, prefix:]
    target = seq[prefix + 1 :]
    kvs = [roundtrip(kv, name, chunk_tokens) for name in names]
    if batched:
        cache = _cache_of(model, torch.stack(kvs))
        logits = model(cont.expand(len(names), -1), **{cache_kwarg(model): cache}, use_cache=True).logits
        rows = [logits[b].float() for b in range(len(names))]
    else:
        rows = [
            model(cont, **{cache_kwarg(model): _cache_of(model, k)}, use_cache=True).logits[0].float()
            for k in kvs
        ]
    return {name: _scores(row, rows[0], target) for name, row in zip(names, rows, strict=True)}


def window_ids(ids: torch.Tensor, i: int, *, prefix: int, cont: int) -> torch.Tensor:
    """Window ``i`` of ``ids``: consecutive, non-overlapping ``prefix + cont`` tokens."""
    w = prefix + cont
    return ids[i * w : (i + 1) * w]


def measure(
    model: Any,
    ids: torch.Tensor,
    codecs: list[str],
    *,
    windows: int,
    prefix: int,
    cont: int,
    chunk_tokens: int = 256,
    progress: Any = None,
    done: dict[int, dict[str, WindowScore]] | None = None,
    on_window: Any = None,
    batched: bool = True,
) -> dict[str, CodecQuality]:
    """Quality per codec over ``windows`` consecutive windows of ``ids`` (1-D token ids).

    ``done``: scores of windows already measured (a resumed run): summed, not recomputed.
    ``on_window(i, scores)`` is called after each newly measured window (to log it), then
    ``progress(i, results)`` (partial results stay usable)."""
    results = {c: CodecQuality(c) for c in [REFERENCE, *codecs]}
    if ids.numel() < windows * (prefix + cont):
        raise WorkloadError(f"need {windows * (prefix + cont)} tokens of text, have {ids.numel()}")
    for i in range(windows):
        scores = (done or {}).get(i)
        if scores is None:
            seq = window_ids(ids, i, prefix=prefix, cont=cont)
            scores = score_window(
                model, seq, codecs, prefix=prefix, chunk_tokens=chunk_tokens, batched=batched
            )
            if on_window is not None:
                on_window(i, scores)
        for name, q in results.items():
            q.add(scores[name])
        if progress is not None:
            progress(i, results)
    return results


def table(results: dict[str, CodecQuality]) -> str:
    ref = results[REFERENCE]
    lines = [
        "| codec | perplexity | Δ vs raw | greedy agreement (teacher-forced) | first-token agreement | first-token KL |",
        "|---|---|---|---|---|---|",
    ]
    for q in results.values():
        lines.append(
            f"| {q.name} | {q.ppl:.4f} | {100 * (q.ppl / ref.ppl - 1):+.2f} % | {100 * q.agreement:.2f} % "
            f"| {q.first_agree}/{q.n_windows} | {q.first_kl:.2e} |"
        )
    return "\n".join(lines)
