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
    codec = get_kv_codec(codec_name)
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
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        cache.update(
            kv[i, 0].transpose(0, 1)[None].contiguous(), kv[i, 1].transpose(0, 1)[None].contiguous(), i
        )
    return cache


@torch.inference_mode()
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
) -> dict[str, CodecQuality]:
    """Quality per codec over ``windows`` consecutive windows of ``ids`` (1-D token ids);
    ``progress(i, results)`` is called after each window (partial results stay usable)."""
    results = {c: CodecQuality(c) for c in [REFERENCE, *codecs]}
    w = prefix + cont
    if ids.numel() < windows * w:
        raise WorkloadError(f"need {windows * w} tokens of text, have {ids.numel()}")
    for i in range(windows):
        seq = ids[i * w : (i + 1) * w][None]
        out = model(seq[:, :prefix], use_cache=True)
        kv = _kv_of(output_cache(out))
        target = seq[0, prefix + 1 :]
        ref_logits: torch.Tensor | None = None
        for name, q in results.items():
            logits = (
                model(
                    seq[:, prefix:],
                    **{cache_kwarg(model): _cache_of(model, roundtrip(kv, name, chunk_tokens))},
                    use_cache=True,
                )
                .logits[0]
                .float()
            )
            logp = torch.log_softmax(logits, -1)
            q.nll_sum += float(-logp[:-1].gather(1, target[:, None]).sum())
            q.n_tokens += int(target.numel())
            q.n_windows += 1
            if ref_logits is None:
                ref_logits = logits
            ref_logp = torch.log_softmax(ref_logits, -1)
            q.agree += int((logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).sum())
            q.first_agree += int(logits[0].argmax() == ref_logits[0].argmax())
            q.first_kl_sum += float((ref_logp[0].exp() * (ref_logp[0] - logp[0])).sum())
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
