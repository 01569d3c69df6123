"""PNG plots (matplotlib, Agg backend: no display needed): TTFT CDF and TTFT vs context length.

One panel per workload, one line (or point cloud) per variant. Kept small (dpi 80) so they can
be committed under ``benchmarks/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.report import WorkloadRuns

COLORS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _figure(n: int, title: str) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    fig.suptitle(title, fontsize=10)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def ttft_cdf(workloads: list[WorkloadRuns], path: Path, title: str) -> Path:
    """Empirical CDF of TTFT per variant: a curve to the left is faster."""
    fig, axes = _figure(len(workloads), title)
    for ax, w in zip(axes, workloads):
        for color, run in zip(COLORS, w.runs):
            t = np.sort([r.ttft_s * 1e3 for r in run.results if r.error is None])
            if len(t):
                y = np.arange(0, len(t) + 1) / len(t)
                ax.step(np.concatenate([[0.0], t]), y, where="post", color=color, label=run.name)
        ax.set_title(w.name, fontsize=10)
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def ttft_vs_context(workloads: list[WorkloadRuns], path: Path, title: str) -> Path:
    """TTFT of every request against its prompt length (filled: a kvtier hit): prefill cost grows with
    context, hits flatten it."""
    fig, axes = _figure(len(workloads), title)
    for ax, w in zip(axes, workloads):
        for color, run in zip(COLORS, w.runs):
            ok = [r for r in run.results if r.error is None]
            hit = [r for r in ok if r.hit_tokens]  # drawn filled; misses and unknown hits hollow
            miss = [r for r in ok if not r.hit_tokens]
            for rs, face, label in ((miss, "none", run.name), (hit, color, f"{run.name}, hit")):
                if rs:
                    ax.scatter(
                        [r.prompt_tokens for r in rs],
                        [r.ttft_s * 1e3 for r in rs],
                        s=16,
                        alpha=0.8,
                        facecolors=face,
                        edgecolors=color,
                        label=label,
                    )
        ax.set_title(w.name, fontsize=10)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_all(workloads: list[WorkloadRuns], out_dir: Path, title: str, prefix: str = "bench") -> list[Path]:
    if not workloads:
        return []
    return [
        ttft_cdf(workloads, out_dir / f"{prefix}_ttft_cdf.png", f"{title}: TTFT CDF"),
        ttft_vs_context(workloads, out_dir / f"{prefix}_ttft_vs_context.png", f"{title}: TTFT vs context"),
    ]
