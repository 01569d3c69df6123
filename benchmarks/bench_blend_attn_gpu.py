"""Attention of the blend's selected-token layers on a GPU: which SDPA form is fastest (issue 14).

    PYTHONPATH=src python benchmarks/bench_blend_attn_gpu.py

Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16), a 16,440-token
prompt, 15 % of 16,384 segment tokens + the 56 others selected (queries spread over the prompt).
Variants, each timed as the median of 20 CUDA-event-timed calls after warm-up:
``dense``: the explicit ``[n_sel, S]`` additive mask, KV repeated to 32 heads (what
transformers' sdpa path does with a mask); ``grouped-G``: queries split into ``G`` position
groups, each attending over keys ``[0, last position of the group]`` only (causal work roughly
halved); ``flex``: ``torch.nn.attention.flex_attention`` compiled, a block mask from
``kv <= position[q]`` (fully masked key blocks skipped, GQA without a KV repeat); ``causal-full``: full prefill's own attention for all 16,440 queries (flash, is_causal),
for scale. Checks every variant's output against ``dense``.
"""

from __future__ import annotations

import itertools
import json
import statistics

import torch
import torch.nn.functional as F


def timed(fn, n: int = 20) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def mask_for(rows: torch.Tensor, keys: int) -> torch.Tensor:
    allowed = torch.arange(keys, device=rows.device)[None, :] <= rows[:, None]
    m = torch.zeros(allowed.shape, dtype=torch.bfloat16, device=rows.device)
    return m.masked_fill_(~allowed, torch.finfo(torch.bfloat16).min)[None, None]


@torch.inference_mode()
def main() -> None:
    dev = torch.device("cuda")
    seq, hq, hk, d = 16440, 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(0)
    perm = torch.randperm(16384, generator=g, device=dev)[: round(0.15 * 16384)] + 24
    rows = (
        torch.cat([torch.arange(24, device=dev), perm, torch.arange(seq - 32, seq, device=dev)]).sort().values
    )
    n = int(rows.numel())
    q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hk, seq, d, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, hk, seq, d, device=dev, dtype=torch.bfloat16, generator=g)
    kr, vr = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    m = mask_for(rows, seq)
    out: dict[str, float] = {}
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=m)
    out["dense_ms"] = timed(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=m))
    out["dense_incl_repeat_ms"] = timed(
        lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=m
        )
    )
    for groups in (4, 8, 16):
        bounds = [round(i * n / groups) for i in range(groups + 1)]
        parts = []
        for a, b in itertools.pairwise(bounds):
            last = int(rows[b - 1]) + 1
            parts.append((a, b, last, mask_for(rows[a:b], last)))

        def grouped(parts=parts) -> torch.Tensor:  # type: ignore[no-untyped-def]
            return torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, a:b], kr[:, :, :last], vr[:, :, :last], attn_mask=mm
                    )
                    for a, b, last, mm in parts
                ],
                dim=2,
            )

        err = float((grouped() - ref).abs().max())
        out[f"grouped{groups}_ms"] = timed(grouped)
        out[f"grouped{groups}_max_abs_vs_dense"] = err
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        pos = rows

        def causal_at(b, h, qi, ki):  # type: ignore[no-untyped-def]
            return ki <= pos[qi]

        flex = torch.compile(flex_attention, dynamic=False)
        for block in (128, 64):
            bm = create_block_mask(causal_at, 1, 1, n, seq, device=dev, BLOCK_SIZE=block)

            def run_flex(bm=bm) -> torch.Tensor:  # type: ignore[no-untyped-def]
                return flex(q, k, v, block_mask=bm, enable_gqa=True)

            out[f"flex{block}_max_abs_vs_dense"] = float((run_flex() - ref).abs().max())
            out[f"flex{block}_ms"] = timed(run_flex)
            out[f"flex{block}_mask_build_ms"] = timed(
                lambda block=block: create_block_mask(causal_at, 1, 1, n, seq, device=dev, BLOCK_SIZE=block),
                n=5,
            )
    except Exception as exc:
        out["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]  # type: ignore[assignment]
    qa = torch.randn(1, hq, seq, d, device=dev, dtype=torch.bfloat16, generator=g)
    out["causal_full_ms"] = timed(lambda: F.scaled_dot_product_attention(qa, kr, vr, is_causal=True))
    out["selected_queries"] = n
    print(json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in out.items()}), flush=True)


if __name__ == "__main__":
    main()
