"""kvtier's flex path for the blend's selected layers, at attention level on a GPU (issue 14).

    PYTHONPATH=src python benchmarks/bench_blend_flex_gpu.py

Same shape as ``bench_blend_attn_gpu.py`` (Llama-3-8B attention: 32 query / 8 KV heads, head_dim
128, bf16; 2,514 selected queries spread over 16,440 keys). Reports, each a median of 20
CUDA-event-timed calls: ``dense_incl_repeat_ms`` (what the mask path costs: transformers repeats
the KV heads, SDPA reads the ``[n, S]`` mask), ``flex_ms`` (``flex.SelectedRows`` with kvtier's
kernel: compiled once, ``dynamic=True``), ``block_mask_build_ms`` (``flex.block_mask``, once per
request), ``first_call_s`` (the compile, paid by the first blend request of a process),
``new_shape_call_s`` (a first call at other query / key counts: small if no recompile) and
``recompiled`` (whether that call compiled again), and the largest difference from the dense path.
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F
from bench_blend_attn_gpu import timed  # the same CUDA-event median timer

from kvtier.blend import flex


def case(seq: int, n_seg: int, dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Sorted selected positions (24 head rows, 15 % of ``n_seg`` segment rows, 32 question rows) and
    q / k / v of that shape."""
    perm = torch.randperm(n_seg, generator=g, device=dev)[: round(0.15 * n_seg)] + 24
    tail = torch.arange(seq - 32, seq, device=dev)
    rows = torch.cat([torch.arange(24, device=dev), perm, tail]).sort().values
    n = int(rows.numel())
    q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, seq, 128, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, seq, 128, device=dev, dtype=torch.bfloat16, generator=g)
    return rows, q, k, v


@torch.inference_mode()
def main() -> None:
    import torch._dynamo.utils

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    seq = 16440
    rows, q, k, v = case(seq, 16384, dev, g)
    out: dict[str, object] = {"torch": torch.__version__, "selected_queries": int(rows.numel())}
    mask = torch.arange(seq, device=dev)[None, :] <= rows[:, None]
    add = torch.zeros(mask.shape, dtype=torch.bfloat16, device=dev).masked_fill_(~mask, -1e30)[None, None]

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=add
        )

    ref = dense().transpose(1, 2)
    out["dense_incl_repeat_ms"] = timed(dense)
    kern = flex.kernel(dev)
    t = time.perf_counter()
    sel = flex.SelectedRows(rows, seq, kern)
    got = sel.attend(q, k, v, None)
    torch.cuda.synchronize()
    out["first_call_s"] = time.perf_counter() - t
    out["flex_max_abs_vs_dense"] = float((got.float() - ref.float()).abs().max())
    out["flex_ms"] = timed(lambda: sel.attend(q, k, v, None))
    out["block_mask_build_ms"] = timed(lambda: flex.block_mask(rows, seq), n=10)
    rows2, q2, k2, v2 = case(12345, 12000, dev, g)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    t = time.perf_counter()
    flex.SelectedRows(rows2, 12345, kern).attend(q2, k2, v2, None)
    torch.cuda.synchronize()
    out["new_shape_call_s"] = time.perf_counter() - t
    out["recompiled"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] != frames
    out["kernel_mode"] = getattr(kern, "mode", None)  # "dynamic", or "automatic" if dynamic failed to build
    out["dynamic_compile_error"] = getattr(kern, "first_error", None)
    print(json.dumps({a: round(b, 4) if isinstance(b, float) else b for a, b in out.items()}), flush=True)


if __name__ == "__main__":
    main()
