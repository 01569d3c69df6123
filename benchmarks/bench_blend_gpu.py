"""Blend (CacheBlend) TTFT vs full prefill on a GPU, Llama-3-8B-shaped model (issue 14).

    PYTHONPATH=src python benchmarks/bench_blend_gpu.py --json /tmp/blend_gpu.json
    PYTHONPATH=src python benchmarks/bench_blend_gpu.py --tiny   # CPU smoke test of the script

A Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads / 8 KV heads, MLP 14336, llama3 rope)
with random weights in bf16, built in code (nothing is downloaded). Every one of ``--docs``
documents of ``--doc-tokens`` random tokens is cached first as a segment (computed on its own, kept
in kvtier's pinned CPU tier). Each request is a system head + the documents in a fresh random
order + a question; its TTFT is measured for full prefill (``model(...)``, flash SDPA) and for
``kvt.prefill(..., segments=, recompute_ratio=)``, which includes the segment lookups, the CPU ->
GPU copies, the re-rotation and the selective recompute. The variants are timed back to back per
request in rotating order; the per-request ratio's median is reported (same-run ratio).
Blend variants: ``blend`` (kvtier's default, ``attention="auto"``: flex attention in the selected
layers on CUDA once its kernel is built) and, unless ``--no-mask-variant``, ``blend_mask`` (flex
off: the dense ``[n_sel, S]`` mask), so the flex gain is a same-run ratio too. Request 0 warms up
and is not counted: its blend starts the flex kernel's background build and uses the mask (its
TTFT is ``first_blend_ttft_s``: no compile inside it); the bench then waits for the build
(``flex_build_wait_s``) so the timed requests all see the same kernel.
Also reported: where a blend's time goes (one extra, profiled request after the timed ones:
``blend_forward`` synchronises at each phase boundary, so its parts sum to a little more than an
unprofiled TTFT): lookups + starting the segment copies, waiting for / placing cached rows,
the layers that compute every token (through the first check layer), the selected-token layers,
and the logits/cache hand-off; and the re-rotation kernel's agreement with the torch path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvtier import CacheEngine, Config
from kvtier.blend import SegmentStore, flex
from kvtier.blend.forward import DEFAULT_CHECK_LAYER
from kvtier.blend.prefill import blend_prefill, segment_kv
from kvtier.integrations import transformers as kvt


def llama3_8b_config(tiny: bool) -> LlamaConfig:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
        shape.update(num_key_value_heads=2, vocab_size=512)
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
        shape.update(num_key_value_heads=8, vocab_size=128256)
    return LlamaConfig(**shape, max_position_embeddings=131072, rope_parameters=rope, rms_norm_eps=1e-5)


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with device:  # initialise on the device: an 8B random init on the host would take minutes
        model = AutoModelForCausalLM.from_config(
            llama3_8b_config(tiny), dtype=dtype, attn_implementation="sdpa"
        ).eval()
    model.config._name_or_path = "random-llama3-8b-shape" + ("-tiny" if tiny else "")
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def full_ttft(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    sync(ids.device)
    t0 = time.perf_counter()
    c = DynamicCache(config=model.config)
    logits = model(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1).logits[:, -1]
    sync(ids.device)
    return logits, time.perf_counter() - t0


def rerotation_check(model: Any, device: torch.device) -> float:
    """Max |triton - torch| over a re-rotation of random bf16 keys (0.0 off CUDA)."""
    from kvtier.blend import rope

    if device.type != "cuda":
        return 0.0
    spec = rope.rope_spec(model)
    cfg = model.config
    k = torch.randn(4, 2048, cfg.num_key_value_heads, spec.head_dim, device=device, dtype=torch.bfloat16)
    old, new = torch.arange(2048, device=device), torch.arange(9000, 9000 + 2048, device=device)
    got = rope.rerotate_keys(k, old, new, spec)
    cos, sin = rope.delta_tables(spec, old, new)
    cos, sin = cos.float()[:, None], sin.float()[:, None]
    kf, half = k.float(), spec.head_dim // 2
    ref = torch.cat(
        (kf[..., :half] * cos - kf[..., half:] * sin, kf[..., half:] * cos + kf[..., :half] * sin), -1
    )
    return float((got.float() - ref.to(torch.bfloat16).float()).abs().max())


def blend_once(model: Any, ids: torch.Tensor, eng: Any, spans: Any, args: Any) -> Any:
    """One blended prefill of ``ids`` as every variant of this bench runs it (nothing stored)."""
    return kvt.prefill(
        model, ids, eng, segments=spans, recompute_ratio=args.ratio, check_layer=args.check_layer, store=False
    )


@contextlib.contextmanager
def dense_mask() -> Iterator[None]:
    """Flex off for the ``blend_mask`` variant (a flex fault earlier in the run: it already is)."""
    fault = flex.disabled()
    if fault is None:
        flex.disable("bench: the dense-mask variant")
    try:
        yield
    finally:
        if fault is None:
            flex.enable()


def trace_requests(model: Any, ids: torch.Tensor, eng: Any, spans: Any, args: Any, extras: Any) -> None:
    """One blend and one full prefill under ``torch.profiler`` (device idle time, host ops in its gaps)
    and one blend under ``cProfile`` (host time by function); printed and saved under ``args.trace``."""
    import cProfile
    import io
    import os
    import pstats

    from torch.profiler import ProfilerActivity, profile, record_function
    from trace_reduce import kernel_totals, reduce_trace

    os.makedirs(args.trace, exist_ok=True)

    def blend() -> None:
        blend_once(model, ids, eng, spans, args)

    def blend_mask() -> None:
        with dense_mask():
            blend()

    def full() -> None:
        full_ttft(model, ids)

    for name, fn in (("blend", blend), ("blend_mask", blend_mask), ("full", full)):
        sync(ids.device)
        with (
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
            record_function("kvtier_call"),
        ):
            fn()
            sync(ids.device)
        path = os.path.join(args.trace, f"trace_{name}.json")
        prof.export_chrome_trace(path)
        print(f"trace {name}:", json.dumps(reduce_trace(path, "kvtier_call")), flush=True)
        print(f"kernels {name} (ms, calls):", flush=True)
        for kname, ms, calls in kernel_totals(path):
            print(f"  {ms:8.2f} {calls:5d}  {kname}", flush=True)
    sync(ids.device)
    pr = cProfile.Profile()
    pr.enable()
    blend()
    sync(ids.device)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print("cProfile blend (tottime):\n" + s.getvalue(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model on CPU: checks the script only")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--check-layer", type=int, default=None, help="default: kvtier's (1)")
    ap.add_argument("--profile-requests", type=int, default=2, help="extra profiled requests (breakdown)")
    ap.add_argument("--no-mask-variant", action="store_true", help="skip the flex-off blend variant")
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--trace", default="", help="a folder: one blend and one full prefill under torch.profiler"
    )
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.tiny:
        args.doc_tokens = min(args.doc_tokens, 64)
    t_build = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    vocab = model.config.vocab_size
    print(f"model built in {time.perf_counter() - t_build:.1f}s on {device}", flush=True)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(100, vocab, (args.doc_tokens,), generator=gen) for _ in range(args.docs)]
    head = torch.randint(100, vocab, (24,), generator=gen)
    question = torch.randint(100, vocab, (32,), generator=gen)
    kv_bytes_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 128 * 2
    need = kv_bytes_per_token * args.docs * args.doc_tokens
    eng = CacheEngine(
        Config.load(
            env={},
            chunk_tokens=256,
            cpu__max_bytes=max(2 * need, 64 * 1024**2),
            cpu__pin_memory="yes" if device.type == "cuda" else "no",
        )
    )
    kvt.bind_engine(eng, model)
    keys = kvt._request_keys(eng, model, head[None], {})
    store = SegmentStore(eng, keys[0] if keys else None)
    t_store = time.perf_counter()
    with torch.inference_mode():
        for d in docs:  # every document cached as a segment, computed on its own from position 0
            store.store(d, segment_kv(model, d.to(device)))
    print(f"{args.docs} segments stored in {time.perf_counter() - t_store:.1f}s", flush=True)
    rng = random.Random(2)
    pairs: list[tuple[float, float]] = []
    mask_pairs: list[tuple[float, float]] = []  # (blend with flex, blend with the dense mask)
    first_blend = 0.0
    variants = ["full", "blend"] + ([] if args.no_mask_variant else ["blend_mask"])
    loads: list[float] = []
    agree: list[float] = []
    seg_tokens = recomputed = seq = 0
    build_wait = 0.0
    for i in range(args.requests + 1):  # request 0 warms both paths up (kernels, allocator); not counted
        order = list(range(args.docs))
        rng.shuffle(order)
        parts, spans, pos = [head], [], int(head.numel())
        for d in order:
            parts.append(docs[d])
            spans.append((pos, pos + int(docs[d].numel())))
            pos += int(docs[d].numel())
        ids = torch.cat([*parts, question])[None].to(device)
        seq = int(ids.shape[1])
        res: dict[str, float] = {}
        shift = i % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if v == "full":
                ref, res[v] = full_ttft(model, ids)
            else:
                with dense_mask() if v == "blend_mask" else contextlib.nullcontext():
                    sync(device)
                    r = blend_once(model, ids, eng, spans, args)
                    sync(device)
                res[v] = r.ttft_s
                if v == "blend_mask":
                    continue
                logits = r.logits
                if i == 0:
                    first_blend = r.ttft_s
                loads.append(r.load_s)
                seg_tokens, recomputed = r.segment_tokens, r.recomputed_tokens
        agree.append(float(int(logits.argmax()) == int(ref.argmax())))
        if i > 0:
            pairs.append((res["full"], res["blend"]))
            if "blend_mask" in res:
                mask_pairs.append((res["blend"], res["blend_mask"]))
        print(i, seq, {k: round(x, 4) for k, x in res.items()}, flush=True)
        if i == 0:
            t_wait = time.perf_counter()
            flex.wait_ready(600)
            build_wait = time.perf_counter() - t_wait
            print(f"flex kernel build: waited {build_wait:.1f}s after request 0", flush=True)
    breakdowns: list[dict[str, float]] = []
    for _ in range(args.profile_requests):  # where the time goes; synchronising, so not in the pairs
        prof: dict[str, float] = {}
        sync(device)
        with torch.inference_mode():  # as kvt.prefill: the same flex kernel (inference tensors)
            o = blend_prefill(
                model,
                ids[0],
                eng,
                spans,
                DynamicCache(config=model.config),
                recompute_ratio=args.ratio,
                check_layer=DEFAULT_CHECK_LAYER if args.check_layer is None else args.check_layer,
                store=False,
                extras=keys[0] if keys else None,
                profile=prof,
            )
        breakdowns.append({"load_start": o.load_s, **prof, "ttft": o.ttft_s})
    if args.trace and device.type == "cuda":
        trace_requests(model, ids, eng, spans, args, keys[0] if keys else None)
    print("breakdown (s):", [{k: round(v, 4) for k, v in b.items()} for b in breakdowns], flush=True)
    ratios = [f / b for f, b in pairs]
    out = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        prompt_tokens=seq,
        docs=args.docs,
        doc_tokens=args.doc_tokens,
        recompute_ratio=args.ratio,
        check_layer=DEFAULT_CHECK_LAYER if args.check_layer is None else args.check_layer,
        segment_tokens=seg_tokens,
        recomputed_tokens=recomputed,
        ttft_full_median_s=statistics.median(p[0] for p in pairs),
        ttft_blend_median_s=statistics.median(p[1] for p in pairs),
        speedup_paired_median=statistics.median(ratios),
        first_blend_ttft_s=first_blend,
        flex_fault=flex.disabled(),
        flex_kernel_mode=getattr(flex._kernels.get(device.type), "mode", None),
        flex_build_wait_s=build_wait,
        ttft_blend_mask_median_s=statistics.median(p[1] for p in mask_pairs) if mask_pairs else None,
        speedup_mask_paired_median=statistics.median(
            f / m for (f, _), (_, m) in zip(pairs, mask_pairs, strict=True)
        )
        if mask_pairs
        else None,
        flex_gain_paired_median=statistics.median(m / b for b, m in mask_pairs) if mask_pairs else None,
        blend_load_median_s=statistics.median(loads[1:]),
        breakdown_s=breakdowns[-1] if breakdowns else {},
        top1_agreement_random_weights=statistics.fmean(agree),
        rerotation_triton_vs_torch_max_abs=rerotation_check(model, device),
        pairs=pairs,
    )
    print(json.dumps({k: v for k, v in out.items() if k != "pairs"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
