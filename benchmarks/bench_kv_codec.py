"""Lossy KV codecs on CPU: quality gate (SmolLM2-135M, real weights and text), compression ratios
of every codec x serde on real KV, and codec throughput per core.

Run: ``PYTHONPATH=src python benchmarks/bench_kv_codec.py [--windows 50] [--codecs fp8,int8] [--skip-quality]
[--log FILE.jsonl [--resume]]``. With ``--log`` each finished window is appended to FILE (one JSON
line); ``--resume`` skips the windows already there, and the table is recomputed from the file, so
a stopped run loses at most the window in progress. ``--windows-only`` stops after the quality table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from kvtier import serde
from kvtier.bench import kv_quality_log
from kvtier.bench.kv_quality import _kv_of, held_out_text, measure, table
from kvtier.models import load_model, output_cache
from kvtier.serde.kvcodec import get_kv_codec
from kvtier.tiers.base import Chunk

CODECS = ["bf16", "fp8", "int8", "int4", "int2"]


def ratios_and_speed(kv: torch.Tensor) -> None:
    """``kv``: real bf16 KV of one 256-token chunk, ``[L, 2, 256, H, D]``."""
    torch.set_num_threads(1)
    raw = kv.numel() * kv.element_size()
    print(f"\nreal SmolLM2 KV chunk {tuple(kv.shape)} bf16, {raw / 1e6:.2f} MB; one thread")
    print("| kv_codec | serde | stored / raw bf16 bytes | encode MB/s per core | decode MB/s per core |")
    print("|---|---|---|---|---|")
    for name in ["none", "fp8", "int8", "int4", "int2"]:
        codec = get_kv_codec(name)
        t_enc = t_dec = 0.0
        packed = kv
        if codec is not None:
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                packed = codec.encode(kv)
            t_enc = (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for _ in range(reps):
                codec.decode(packed, tuple(kv.shape), kv.dtype)
            t_dec = (time.perf_counter() - t0) / reps
        for sd in ["raw", "zstd", "shuffle-zstd"]:
            chunk = Chunk(packed, b"f" * 8, 256)
            t0 = time.perf_counter()
            blob = serde.encode(chunk, sd)
            t_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            serde.decode(blob)
            t_d = time.perf_counter() - t0
            enc = raw / 1e6 / (t_enc + t_s) if (t_enc + t_s) > 0 else float("inf")
            dec = raw / 1e6 / (t_dec + t_d) if (t_dec + t_d) > 0 else float("inf")
            print(f"| {name} | {sd} | {len(blob) / raw:.3f} | {enc:.0f} | {dec:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--prefix", type=int, default=384)
    ap.add_argument("--cont", type=int, default=128)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated; raw is always measured")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--windows-only", action="store_true", help="stop after the quality table")
    ap.add_argument("--log", type=Path, help="append each finished window to this JSONL file")
    ap.add_argument("--resume", action="store_true", help="skip the windows already in --log")
    a = ap.parse_args()
    if a.resume and a.log is None:
        sys.exit("--resume needs --log FILE (the file of the run to resume)")
    if a.log is not None and not a.resume and a.log.exists() and a.log.stat().st_size:
        sys.exit(f"{a.log} exists: pass --resume to continue that run, or another --log file")
    torch.set_num_threads(2)
    lm = load_model("smollm2")
    print(
        f"kvtier bench_kv_codec, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {torch.get_num_threads()} threads"
    )
    ids = torch.tensor(lm.tokenizer(held_out_text())["input_ids"])
    print(f"model {lm.model_id}; text: pydoc_data.topics, {ids.numel()} tokens")
    if not a.skip_quality:
        codecs = a.codecs.split(",")
        key = kv_quality_log.RunKey(lm.model_id, "pydoc_data.topics", a.prefix, a.cont, 256)
        done = kv_quality_log.load(a.log, key, ["none", *codecs]) if a.log is not None else {}
        done = {i: s for i, s in done.items() if i < a.windows}
        if done:
            print(f"resuming {a.log}: {len(done)} windows done")
        t0 = time.perf_counter()

        def on_window(i: int, scores: dict) -> None:
            if a.log is not None:
                kv_quality_log.append(a.log, key, i, scores)

        def progress(i: int, res: dict) -> None:
            if i in done:
                return
            print(f"after window {i + 1}, {time.perf_counter() - t0:.0f} s", flush=True)
            if (i + 1) % 4 == 0:
                print(table(res), flush=True)

        res = measure(
            lm.model,
            ids,
            codecs,
            windows=a.windows,
            prefix=a.prefix,
            cont=a.cont,
            chunk_tokens=key.chunk_tokens,
            progress=progress,
            done=done,
            on_window=on_window,
        )
        ref = res["none"]
        print(
            f"{ref.n_windows} windows x ({a.prefix} cached + {a.cont} fed) tokens: "
            f"{ref.n_tokens} scored tokens, {ref.n_windows} prompts, {time.perf_counter() - t0:.0f} s "
            f"this run\n"
        )
        print(table(res), flush=True)
    if a.windows_only:
        return
    with torch.inference_mode():
        out = lm.model(ids[None, 1000:1256], use_cache=True)
    ratios_and_speed(_kv_of(output_cache(out)).to(torch.bfloat16).contiguous())


if __name__ == "__main__":
    main()
