"""Flex attention for the blend's selected layers: query layout and kernel options (issue 14).

    PYTHONPATH=src python benchmarks/bench_blend_flex_tune.py

Same case as ``bench_blend_flex_gpu.py`` (Llama-3-8B attention, 2,514 selected queries over 16,440
keys, bf16). Inside a blend flex measured 2.38 ms a layer (profiler, 30 calls) against 1.29 ms in
that probe; the differences are the query's memory layout (transformers' ``[1, n, H, D]`` storage
seen as ``[1, H, n, D]``) and nothing else. Reported per variant, a median of 20 CUDA-event-timed
calls: contiguous vs transformers' layout, and ``kernel_options`` (tile sizes, warps, stages)
on the transformers layout; each variant's max difference from the default's output.
Then the blend's own tensors (K/V as layer views of one ``KVBuffer``): 2.26 ms vs 1.50 ms cloned (s8a),
because a dynamic compile cannot prove a view's storage offset aligned; kvtier's compile options
(``flex.COMPILE_OPTIONS``, ``assume_aligned_inputs``) on the same views are the last row.
"""

from __future__ import annotations

import json

import torch
from bench_blend_attn_gpu import timed
from bench_blend_flex_gpu import case

from kvtier.blend import flex

OPTIONS: list[dict[str, int] | None] = [
    None,
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
]


def skewed_rows(seq: int, n: int, dev: torch.device, g: torch.Generator) -> torch.Tensor:
    """``n`` sorted positions drawn with probability growing with the position (a blend's selection
    favours later documents: their cached KV missed more cross-document context)."""
    w = torch.arange(1, seq + 1, device=dev, dtype=torch.float32)
    return torch.multinomial(w, n, replacement=False, generator=g).sort().values


def backends(
    dev: torch.device, g: torch.Generator, k: torch.Tensor, v: torch.Tensor, seq: int
) -> dict[str, object]:
    """Attention for selected rows by kernel: flex (default, TMA), SDPA with the additive mask
    (efficient / cuDNN backends, with and without repeating KV heads), uniform vs skewed rows."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    out: dict[str, object] = {}
    fn = torch.compile(flex_attention, dynamic=True)
    for label, rows in (("uniform", case(seq, 16384, dev, g)[0]), ("skewed", skewed_rows(seq, 2514, dev, g))):
        n = int(rows.numel())
        q = torch.randn(1, n, 32, 128, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2)
        out[f"{label} mean keys per query"] = float(rows.float().mean() + 1)
        bm = flex.block_mask(rows, seq)
        ref = fn(q, k, v, block_mask=bm, enable_gqa=True)
        out[f"{label} flex ms"] = timed(lambda q=q, bm=bm: fn(q, k, v, block_mask=bm, enable_gqa=True))
        for opts in (
            {"USE_TMA": True},
            {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "USE_TMA": True},
        ):
            name = ",".join(f"{a}={b}" for a, b in opts.items())
            try:
                fn(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts)
                out[f"{label} flex {name} ms"] = timed(
                    lambda q=q, bm=bm, opts=opts: fn(
                        q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts
                    )
                )
            except Exception as exc:  # an option this torch does not take: report it
                out[f"{label} flex {name} error"] = f"{type(exc).__name__}: {exc}"[:160]
        allowed = torch.arange(seq, device=dev)[None, :] <= rows[:, None]
        add = torch.zeros(allowed.shape, dtype=torch.bfloat16, device=dev).masked_fill_(~allowed, -1e30)[
            None, None
        ]
        kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        for bname, be in (
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            for gqa in (False, True):
                tag = f"{label} sdpa {bname} mask{' gqa' if gqa else ' repeat'} ms"
                try:
                    with sdpa_kernel(be):
                        if gqa:
                            got = F.scaled_dot_product_attention(q, k, v, attn_mask=add, enable_gqa=True)
                            out[tag] = timed(
                                lambda q=q, add=add: F.scaled_dot_product_attention(
                                    q, k, v, attn_mask=add, enable_gqa=True
                                )
                            )
                        else:
                            got = F.scaled_dot_product_attention(q, kr, vr, attn_mask=add)
                            out[tag] = timed(
                                lambda q=q, add=add, kr=kr, vr=vr: F.scaled_dot_product_attention(
                                    q, kr, vr, attn_mask=add
                                )
                            )
                    out[tag.replace(" ms", " max_abs")] = float((got.float() - ref.float()).abs().max())
                except Exception as exc:  # a backend that does not take this call
                    out[tag.replace(" ms", " error")] = f"{type(exc).__name__}: {exc}"[:160]
    return out


@torch.inference_mode()
def main() -> None:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64
    from torch.nn.attention.flex_attention import flex_attention

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    seq = 16440
    rows, q, k, v = case(seq, 16384, dev, g)
    n = int(rows.numel())
    q_hf = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, transformers' storage
    bm = flex.block_mask(rows, seq)
    fn = torch.compile(flex_attention, dynamic=True)
    res: dict[str, object] = {"selected_queries": n, "keys": seq}

    def call(qq: torch.Tensor, opts: dict[str, int] | None) -> torch.Tensor:
        kw = {} if opts is None else {"kernel_options": opts}
        return fn(qq, k, v, block_mask=bm, enable_gqa=True, **kw)

    ref = call(q, None)
    res["contiguous_q_ms"] = timed(lambda: call(q, None))
    res["hf_layout_q_ms"] = timed(lambda: call(q_hf, None))
    res["hf_layout_then_contiguous_ms"] = timed(lambda: call(q_hf.contiguous(), None))
    for opts in OPTIONS[1:]:
        name = "opts " + ",".join(f"{a}={b}" for a, b in (opts or {}).items())
        for label, qq in (("contig", q), ("hf", q_hf)):
            try:
                out = call(qq, opts)
                res[f"{name} [{label}] ms"] = timed(lambda qq=qq, opts=opts: call(qq, opts))
                res[f"{name} [{label}] max_abs"] = float((out.float() - ref.float()).abs().max())
            except Exception as exc:  # a config the template cannot build: report it, go on
                res[f"{name} [{label}] error"] = f"{type(exc).__name__}: {exc}"[:200]
    import torch.nn.functional as F

    q_full = torch.randn(1, 32, seq, 128, device=dev, dtype=torch.bfloat16, generator=g)
    res["sdpa_flash_causal_full_ms"] = timed(
        lambda: F.scaled_dot_product_attention(q_full, k, v, is_causal=True, enable_gqa=True)
    )
    res.update(backends(dev, g, k, v, seq))
    # the blend's own tensors: K/V as layer views of one [L, 2, 1, H, S, D] buffer, q out of a
    # projection and a rotary-style elementwise op (transformers' storage), the real block mask
    buf = torch.empty(32, 2, 1, 8, seq, 128, device=dev, dtype=torch.bfloat16)
    buf[5, 0, 0].copy_(k[0])
    buf[5, 1, 0].copy_(v[0])
    kb, vb = buf[5, 0], buf[5, 1]
    h = torch.randn(1, n, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    wq = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16, generator=g) / 64
    cos = torch.randn(1, 1, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
    qp = (h @ wq).view(1, n, 32, 128).transpose(1, 2)
    qr = qp * cos + qp.flip(-1) * cos
    res["q strides (projection + rotary)"] = str(tuple(qr.stride()))
    res["in-situ views flex ms"] = timed(lambda: fn(qr, kb, vb, block_mask=bm, enable_gqa=True, scale=0.088))
    res["in-situ views, k/v cloned flex ms"] = timed(
        lambda: fn(qr, kb.clone(), vb.clone(), block_mask=bm, enable_gqa=True, scale=0.088)
    )
    aligned = torch.compile(flex_attention, dynamic=True, options=flex.COMPILE_OPTIONS)
    res["in-situ views, kvtier's compile (assume_aligned_inputs) flex ms"] = timed(
        lambda: aligned(qr, kb, vb, block_mask=bm, enable_gqa=True, scale=0.088)
    )
    got = aligned(qr, kb, vb, block_mask=bm, enable_gqa=True, scale=0.088)
    want = fn(qr, kb.clone(), vb.clone(), block_mask=bm, enable_gqa=True, scale=0.088)
    res["in-situ views, kvtier's compile max_abs vs cloned"] = float((got.float() - want.float()).abs().max())
    for a, b in res.items():
        print(f"{a}: {round(b, 4) if isinstance(b, float) else b}", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
