"""Summaries, the printed table and the PNG plot of a with/without comparison.

The headline speedup is the *paired* one: the median over requests of (TTFT without / TTFT with),
each pair measured back to back (``runner.run_interleaved``), so load from other processes that
drifts during the run cancels out. Beside the times the report prints what does not depend on the
machine's load at all: prompt tokens not recomputed and the prefill FLOPs they would have cost
(``flops.PrefillCost``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvtier.config import LOSSLESS_KV_CODECS
from kvtier.demo.flops import PrefillCost, human
from kvtier.demo.runner import RequestResult
from kvtier.observability import CacheStats


@dataclass
class WorkloadReport:
    name: str
    without: list[RequestResult]
    with_: list[RequestResult]
    stats: CacheStats
    cost: PrefillCost | None = None  # the model's prefill FLOPs (None: not reported)
    kv_codec: str = "none"  # the lossy KV codec the with-variant stored chunks under ("none": exact)

    @property
    def paired_speedup(self) -> float:
        """Median over requests of TTFT without / TTFT with kvtier (pairs run back to back)."""
        ratios = [a.ttft_s / b.ttft_s for a, b in zip(self.without, self.with_) if b.ttft_s > 0]
        return float(np.median(ratios)) if ratios else float("nan")

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens loaded from kvtier instead of recomputed (blend: minus the recomputed ones;
        every token still runs the layers up to the check layer, so this slightly overstates the
        work saved by a blend)."""
        return sum(r.hit_tokens - r.recomputed_tokens for r in self.with_)

    @property
    def blended(self) -> bool:
        """The with-variant blended (rag): approximate by design, judged by agreement, not identity."""
        return any(r.segment_tokens is not None for r in self.with_)

    @property
    def lossy(self) -> bool:
        """Approximate by design: blended, or served from chunks a lossy ``kv_codec`` quantized."""
        return self.blended or self.kv_codec not in LOSSLESS_KV_CODECS

    @property
    def first_token_agreement(self) -> int:
        return sum(a.tokens[:1] == b.tokens[:1] for a, b in zip(self.without, self.with_))

    def flops(self) -> tuple[float, float] | None:
        """(prefill FLOPs saved by kvtier, prefill FLOPs of the workload without it)."""
        if self.cost is None:
            return None
        c = self.cost
        return sum(c.saved(r.hit_tokens - r.recomputed_tokens) for r in self.with_), sum(
            c.flops(0, r.prompt_tokens) for r in self.without
        )

    @property
    def identical(self) -> int:
        """Requests whose greedy continuation is the same with and without kvtier."""
        return sum(a.tokens == b.tokens for a, b in zip(self.without, self.with_))

    @property
    def max_logit_diff(self) -> float:
        diffs = [
            float((a.first_logits - b.first_logits).abs().max())
            for a, b in zip(self.without, self.with_)
            if a.first_logits is not None and b.first_logits is not None
        ]
        # NaN-aware: Python's max() may drop a NaN (max([0.0, nan]) is 0.0), hiding a broken hit
        return float(np.max(diffs)) if diffs else 0.0

    @property
    def split_logit_diff(self) -> float | None:
        """Max |logit diff| between a plain prefill split where kvtier split it and the one-shot prefill."""
        diffs = [
            float((a.first_logits - b.split_logits).abs().max())
            for a, b in zip(self.without, self.with_)
            if a.first_logits is not None and b.split_logits is not None
        ]
        return max(diffs) if diffs else None

    @property
    def ok(self) -> bool:
        """Greedy outputs identical; or, in low-precision runs, kvtier's logits no further from the
        one-shot prefill than splitting the prefill at the same token without any cache (x2), so
        any difference is the dtype's rounding, not the cache's. A blended workload or a lossy
        ``kv_codec`` is approximate by design (its quality is reported: ``first_token_agreement``,
        ``identical``, ``max_logit_diff``; the codecs' quality gate is ``kvtier.bench.kv_quality``)."""
        if self.lossy:  # approximate by design, but never non-finite
            return all(
                bool(torch.isfinite(b.first_logits).all()) for b in self.with_ if b.first_logits is not None
            )
        if self.identical == len(self.without):
            return True
        ref = self.split_logit_diff
        return ref is not None and self.max_logit_diff <= 2 * ref + 1e-6


def _ms(xs: list[float]) -> tuple[float, float, float]:
    a = np.asarray(xs) * 1e3
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 90))


def _size(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m:
            return f"{n / m:.1f} {unit}"
    return f"{n} B"


def _flops_text(rep: WorkloadReport) -> str:
    f = rep.flops()
    if f is None:
        return ""
    saved, total = f
    return f", prefill FLOPs saved {human(saved)} of {human(total)} ({saved / total if total else 0:.1%})"


def format_report(rep: WorkloadReport) -> str:
    wo = [r.ttft_s for r in rep.without]
    wi = [r.ttft_s for r in rep.with_]
    m0, p50_0, p90_0 = _ms(wo)
    m1, p50_1, p90_1 = _ms(wi)
    s = rep.stats
    prompt = sum(r.prompt_tokens for r in rep.without)
    tiers = ", ".join(f"{name} {_size(t.bytes_used)} ({t.chunks} chunks)" for name, t in s.tiers.items())
    lines = [
        f"== {rep.name}: {len(wo)} requests, {prompt:,} prompt tokens ==",
        f"{'TTFT (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}",
        f"{'without kvtier':<16}{m0:>10.1f}{p50_0:>10.1f}{p90_0:>10.1f}",
        f"{'with kvtier':<16}{m1:>10.1f}{p50_1:>10.1f}{p90_1:>10.1f}",
        f"{'ratio':<16}{m0 / m1:>9.2f}x{p50_0 / p50_1:>9.2f}x{p90_0 / p90_1:>9.2f}x",
        f"speedup {rep.paired_speedup:.2f}x (paired: median over requests of TTFT without / with, each "
        f"pair run back to back, so the machine's load drift cancels)",
        f"work not done (independent of load): {rep.reused_tokens:,} of {prompt:,} prompt tokens not "
        f"recomputed ({rep.reused_tokens / max(prompt, 1):.1%})" + _flops_text(rep),
        f"token hit rate {s.hit_rate:.1%}, request hit rate {s.request_hit_rate:.1%}, store after TTFT "
        f"{sum(r.store_s for r in rep.with_) * 1e3:.0f} ms total",
        "bytes per tier: " + tiers,
        f"greedy outputs identical with and without kvtier: {'yes' if rep.identical == len(wo) else 'NO'} "
        f"({rep.identical}/{len(wo)}), max |logit diff| of the first token {rep.max_logit_diff:.2e}",
    ]
    if rep.blended:
        seg = sum(r.segment_tokens or 0 for r in rep.with_)
        rec = sum(r.recomputed_tokens for r in rep.with_)
        n = len(wo)
        lines[-1] = (
            f"blend (CacheBlend, approximate by design): {seg:,} passage tokens reused at other positions, "
            f"{rec:,} of them recomputed; vs full prefill: greedy outputs identical {rep.identical}/{n}, "
            f"first token {rep.first_token_agreement}/{n}, max |logit diff| {rep.max_logit_diff:.2e}"
        )
    elif rep.lossy:
        n = len(wo)
        lines[-1] = (
            f"lossy KV codec {rep.kv_codec} (approximate by design): vs full prefill greedy outputs identical "
            f"{rep.identical}/{n}, first token {rep.first_token_agreement}/{n}, max |logit diff| of the first "
            f"token {rep.max_logit_diff:.2e}"
        )
    ref = rep.split_logit_diff
    if ref is not None and rep.lossy:
        lines.append(
            f"for scale: the same prefill split at the same token without kvtier differs by up to {ref:.2e}"
        )
    elif ref is not None:
        lines.append(
            f"reference: the same prefill split at the same token without kvtier differs by up to "
            f"{ref:.2e} (low-precision rounding); within 2x of it: {'yes' if rep.ok else 'NO'}"
        )
    if rep.name == "context":
        lines.append(
            f"{'context':<22}{'prefill (ms)':>14}{'first, miss':>14}{'full hit':>12}{'(load)':>10}"
            f"{'speedup':>10}"
        )
        for i in range(0, len(rep.without) - 1, 2):
            base, miss, hit = rep.without[i + 1], rep.with_[i], rep.with_[i + 1]
            lines.append(
                f"{base.prompt_tokens:>8} tokens{'':<7}{base.ttft_s * 1e3:>14.1f}{miss.ttft_s * 1e3:>14.1f}"
                f"{hit.ttft_s * 1e3:>12.1f}{hit.load_s * 1e3:>10.1f}{base.ttft_s / hit.ttft_s:>9.1f}x"
            )
    return "\n".join(lines)


def plot(reports: list[WorkloadReport], path: Path, title: str) -> Path:
    """TTFT per request, with vs without kvtier, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        x = np.arange(1, len(rep.without) + 1)
        ax.plot(x, [r.ttft_s * 1e3 for r in rep.without], "o-", label="without kvtier", color="tab:gray")
        ax.plot(x, [r.ttft_s * 1e3 for r in rep.with_], "o-", label="with kvtier", color="tab:blue")
        ax.set_title(f"{rep.name} (hit rate {rep.stats.hit_rate:.0%})")
        ax.set_xlabel("request")
        ax.set_ylabel("TTFT (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
