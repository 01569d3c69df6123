"""Summaries, the printed table, the JSON file and ``--compare``.

The JSON file (``kvtier_bench: 1``) holds every request's result, so a later ``--compare``
or plot needs nothing but the files. Summaries are recomputed from the results on load.

Hit rates: per request from the in-process kvtier driver (``hit_tokens``); else the daemon's
``/stats`` delta (key and lookup hit rates); else unknown ("-").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.drivers import Result
from kvtier.bench.runner import VariantRun
from kvtier.errors import KVTierError

FORMAT_VERSION = 1


class ReportError(KVTierError, ValueError):
    """A file given to ``--compare`` is not a kvtier bench JSON file."""


@dataclass
class WorkloadRuns:
    name: str
    params: dict[str, Any]
    runs: list[VariantRun]


def summarize(run: VariantRun) -> dict[str, Any]:
    ok = [r for r in run.results if r.error is None]
    ttft = np.asarray([r.ttft_s for r in ok], dtype=float) * 1e3
    prompt = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    s: dict[str, Any] = {
        "requests": len(run.results),
        "errors": len(run.results) - len(ok),
        "prompt_tokens": prompt,
        "output_tokens": out,
        "wall_s": run.wall_s,
    }
    for name, q in (("mean", None), ("p50", 50), ("p90", 90), ("p99", 99)):
        s[f"ttft_{name}_ms"] = (
            (float(ttft.mean()) if q is None else float(np.percentile(ttft, q))) if len(ok) else None
        )
    s["throughput_tok_s"] = (prompt + out) / run.wall_s if run.wall_s > 0 else None
    s["output_tok_s"] = out / run.wall_s if run.wall_s > 0 else None
    hits = [r.hit_tokens for r in ok if r.hit_tokens is not None]
    s["request_hit_rate"] = s["token_hit_rate"] = None
    if hits and len(hits) == len(ok):
        s["request_hit_rate"] = sum(h > 0 for h in hits) / len(hits)
        s["token_hit_rate"] = sum(hits) / prompt if prompt else 0.0
    elif run.cache and run.cache.get("source") == "daemon /stats":
        s["token_hit_rate"] = run.cache.get("hit_rate")
        s["request_hit_rate"] = run.cache.get("request_hit_rate")
    blended = [r for r in ok if r.segment_tokens is not None]
    if blended:
        s["segment_tokens"] = sum(r.segment_tokens or 0 for r in blended)
        s["recomputed_tokens"] = sum(r.recomputed_tokens or 0 for r in blended)
    return s


def blend_quality(base: VariantRun, run: VariantRun) -> dict[str, Any] | None:
    """Agreement of a blend variant with ``base`` (full prefill) on the same requests: greedy
    outputs identical, first token identical; None if ``run`` blended nothing or requests differ."""
    if not any(r.segment_tokens is not None for r in run.results) or len(base.results) != len(run.results):
        return None
    pairs = [
        (a.output, b.output)
        for a, b in zip(base.results, run.results)
        if a.error is None and b.error is None and isinstance(a.output, list) and isinstance(b.output, list)
    ]
    if not pairs or any(a.label != b.label for a, b in zip(base.results, run.results)):
        return None
    return {
        "requests": len(pairs),
        "identical_outputs": sum(a == b for a, b in pairs),
        "first_token_agreement": sum(a[:1] == b[:1] for a, b in pairs),
    }


def blend_line(base: VariantRun, run: VariantRun) -> str | None:
    """One line on what a blend variant reused and recomputed, and its quality vs ``base``."""
    s = summarize(run)
    if "segment_tokens" not in s:
        return None
    prompt = max(s["prompt_tokens"], 1)
    line = (
        f"   {run.name}: {s['segment_tokens']:,} prompt tokens reused from segments "
        f"({s['segment_tokens'] / prompt:.0%}), {s['recomputed_tokens']:,} of them recomputed"
    )
    q = blend_quality(base, run) if base is not run else None
    if q:
        n = q["requests"]
        line += (
            f"; vs '{base.name}': greedy outputs identical {q['identical_outputs']}/{n}, "
            f"first token {q['first_token_agreement']}/{n}"
        )
    return line


def to_json(workloads: list[WorkloadRuns], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "kvtier_bench": FORMAT_VERSION,
        **meta,
        "workloads": [
            {
                "name": w.name,
                "params": w.params,
                "variants": [
                    {
                        "name": r.name,
                        "wall_s": r.wall_s,
                        "cache": r.cache,
                        "extra": r.extra,
                        "summary": summarize(r),
                        "blend_quality": blend_quality(w.runs[0], r) if r is not w.runs[0] else None,
                        "results": [x.to_dict() for x in r.results],
                    }
                    for r in w.runs
                ],
            }
            for w in workloads
        ],
    }


def save(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))


def load(path: Path) -> tuple[dict[str, Any], list[WorkloadRuns]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read a kvtier bench JSON file: {e}") from e
    if not isinstance(doc, dict) or doc.get("kvtier_bench") != FORMAT_VERSION:
        raise ReportError(f"{path}: not a kvtier bench JSON file (format {FORMAT_VERSION})")
    out = []
    for w in doc["workloads"]:
        runs = [
            VariantRun(
                v["name"],
                [Result.from_dict(x) for x in v["results"]],
                float(v["wall_s"]),
                v.get("cache"),
                v.get("extra") or {},
            )
            for v in w["variants"]
        ]
        out.append(WorkloadRuns(w["name"], w.get("params", {}), runs))
    return doc, out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


HEADER = (
    f"{'variant':<22}{'TTFT ms: mean':>14}{'p50':>9}{'p90':>9}{'p99':>9}{'tok/s':>9}{'req hit':>9}"
    f"{'tok hit':>9}{'speedup':>9}{'paired':>8}"
)
LEGEND = (
    "speedup: mean TTFT of the first variant / this one's; paired: median over requests of the "
    "per-request TTFT ratio (robust to load drift, as variants run interleaved)"
)


def paired_speedup(base: VariantRun, run: VariantRun) -> float | None:
    """Median over requests of base TTFT / this TTFT; None unless both ran the same requests."""
    if len(base.results) != len(run.results) or any(
        a.label != b.label for a, b in zip(base.results, run.results)
    ):
        return None
    ratios = [
        a.ttft_s / b.ttft_s
        for a, b in zip(base.results, run.results)
        if a.error is None and b.error is None and b.ttft_s > 0
    ]
    return float(np.median(ratios)) if ratios else None


def row(name: str, s: dict[str, Any], base_mean: float | None, paired: float | None = None) -> str:
    mean = s["ttft_mean_ms"]
    speed = base_mean / mean if base_mean and mean else None
    return (
        f"{name[:21]:<22}{_f(mean, '.1f'):>14}{_f(s['ttft_p50_ms'], '.1f'):>9}{_f(s['ttft_p90_ms'], '.1f'):>9}"
        f"{_f(s['ttft_p99_ms'], '.1f'):>9}{_f(s['throughput_tok_s'], '.0f'):>9}"
        f"{_f(s['request_hit_rate'], '.0%'):>9}{_f(s['token_hit_rate'], '.0%'):>9}"
        f"{(_f(speed, '.2f') + 'x') if speed else '-':>9}{(_f(paired, '.2f') + 'x') if paired else '-':>8}"
    )


def identical_outputs(runs: list[VariantRun]) -> str | None:
    """'k/n' requests whose greedy tokens equal the first variant's, for every variant (in-process)."""
    if len(runs) < 2 or not all(
        isinstance(r.output, list) for v in runs for r in v.results if r.error is None
    ):
        return None
    base = runs[0].results
    same = [sum(a.output == b.output for a, b in zip(base, v.results)) for v in runs[1:]]
    return ", ".join(f"{v.name} {n}/{len(base)}" for v, n in zip(runs[1:], same))


def format_workload(w: WorkloadRuns) -> str:
    first = w.runs[0].results if w.runs else []
    params = " ".join(f"{k}={v}" for k, v in w.params.items())
    lines = [
        f"== {w.name}: {len(first)} requests, {sum(r.prompt_tokens for r in first):,} prompt tokens ({params}) ==",
        HEADER,
    ]
    base = summarize(w.runs[0])["ttft_mean_ms"] if w.runs else None
    for r in w.runs:
        s = summarize(r)
        lines.append(row(r.name, s, base, paired_speedup(w.runs[0], r)))
        if s["errors"]:
            bad = next(x for x in r.results if x.error is not None)
            lines.append(f"   {s['errors']} failed requests, e.g. {bad.label}: {bad.error}")
        extra = blend_line(w.runs[0], r)
        if extra:
            lines.append(extra)
    same = identical_outputs(w.runs)
    if same:
        lines.append(f"greedy outputs identical to '{w.runs[0].name}': {same}")
    return "\n".join(lines)


def format_compare(a_name: str, a: list[WorkloadRuns], b_name: str, b: list[WorkloadRuns]) -> str:
    """Side by side: every variant of A then of B per workload both hold; speedup vs A's first variant."""
    by_name = {w.name: w for w in b}
    blocks = []
    for wa in a:
        wb = by_name.get(wa.name)
        if wb is None:
            continue
        if len(wa.runs[0].results) != len(wb.runs[0].results):
            blocks.append(
                f"note: {wa.name} has {len(wa.runs[0].results)} requests in {a_name}, "
                f"{len(wb.runs[0].results)} in {b_name}: different sizes or seeds"
            )
        base = summarize(wa.runs[0])["ttft_mean_ms"]
        lines = [f"== {wa.name}: {a_name} (A) vs {b_name} (B) ==", HEADER]
        lines += [row(f"A {r.name}", summarize(r), base, paired_speedup(wa.runs[0], r)) for r in wa.runs]
        lines += [row(f"B {r.name}", summarize(r), base, paired_speedup(wa.runs[0], r)) for r in wb.runs]
        blocks.append("\n".join(lines))
    if not blocks:
        return f"{a_name} and {b_name} share no workload"
    return "\n\n".join(blocks)


def merge_for_compare(
    a: list[WorkloadRuns], b: list[WorkloadRuns], a_tag: str, b_tag: str
) -> list[WorkloadRuns]:
    """The workloads both hold, with variants renamed 'A-tag: name' (for plotting two files together)."""
    by_name = {w.name: w for w in b}
    out = []
    for wa in a:
        wb = by_name.get(wa.name)
        if wb is None:
            continue
        runs = [VariantRun(f"{a_tag}: {r.name}", r.results, r.wall_s, r.cache) for r in wa.runs]
        runs += [VariantRun(f"{b_tag}: {r.name}", r.results, r.wall_s, r.cache) for r in wb.runs]
        out.append(WorkloadRuns(wa.name, wa.params, runs))
    return out
