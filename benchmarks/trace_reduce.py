"""Reduce a ``torch.profiler`` chrome trace to where a GPU call's wall time goes.

Used by the GPU benchmarks' ``--trace`` options: for the span of a ``record_function`` mark, the
union of device activity (kernels and memcpys on every stream), the idle time of the device inside
the span (gaps between activity, split by size), and the host ops running during the largest idle
gaps. A call whose device idles a large share of its span is host-bound: faster kernels cannot help.
"""

from __future__ import annotations

import json
from typing import Any


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def reduce_trace(path: str, mark: str, top_gaps: int = 5) -> dict[str, Any]:
    """Figures (ms) for the first ``mark`` span in the trace at ``path``; prints nothing."""
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    spans = [
        e
        for e in ev
        if e.get("name") == mark and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation"
    ]
    if not spans:
        return {"error": f"no {mark!r} span in {path}"}
    t0 = float(spans[0]["ts"])
    t1 = t0 + float(spans[0]["dur"])
    dev = [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in ev
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    dev = [(max(a, t0), min(b, t1)) for a, b in dev if b > t0 and a < t1]
    busy = _union(dev)
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    lead = busy[0][0] - t0 if busy else t1 - t0
    tail = t1 - busy[-1][1] if busy else 0.0
    sizes = [b - a for a, b in gaps]
    kern = [
        float(e.get("dur", 0))
        for e in ev
        if e.get("ph") == "X" and e.get("cat") == "kernel" and t0 <= float(e["ts"]) < t1
    ]
    cpu = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function")]
    big = sorted(gaps, key=lambda g: g[0] - g[1])[:top_gaps]
    where = []
    for a, b in big:
        names: dict[str, float] = {}
        for e in cpu:
            s, d = float(e["ts"]), float(e.get("dur", 0))
            ov = min(s + d, b) - max(s, a)
            if ov > 0 and d < (t1 - t0) * 0.5:
                names[e["name"]] = names.get(e["name"], 0.0) + ov
        top = sorted(names.items(), key=lambda kv: -kv[1])[:5]
        where.append(
            {
                "at_ms": (a - t0) / 1e3,
                "gap_ms": (b - a) / 1e3,
                "host": {n[:60]: round(v / 1e3, 2) for n, v in top},
            }
        )
    return {
        "span_ms": (t1 - t0) / 1e3,
        "device_busy_ms": sum(b - a for a, b in busy) / 1e3,
        "device_idle_ms": (t1 - t0 - sum(b - a for a, b in busy)) / 1e3,
        "lead_ms": lead / 1e3,
        "tail_ms": tail / 1e3,
        "gaps_over_50us": sum(1 for s in sizes if s > 50),
        "gaps_over_50us_ms": sum(s for s in sizes if s > 50) / 1e3,
        "gaps_under_50us_ms": sum(s for s in sizes if s <= 50) / 1e3,
        "kernels": len(kern),
        "kernel_sum_ms": sum(kern) / 1e3,
        "largest_gaps": where,
    }


def kernel_totals(path: str, top: int = 15) -> list[tuple[str, float, int]]:
    """Device time (ms) and count per kernel name in the trace at ``path``, largest first."""
    with open(path) as f:
        ev = json.load(f)["traceEvents"]
    tot: dict[str, list[float]] = {}
    for e in ev:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            t = tot.setdefault(str(e.get("name", "?"))[:90], [0.0, 0])
            t[0] += float(e.get("dur", 0)) / 1e3
            t[1] += 1
    rows = sorted(((n, v[0], int(v[1])) for n, v in tot.items()), key=lambda r: -r[1])
    return rows[:top]
