"""The demo's orchestration: load the model, build each workload, run it without and with kvtier
interleaved request by request (a fresh engine per workload, so hit rates and bytes are per
workload), print, plot."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvtier.chunk import dtype_from_name
from kvtier.cli_args import load_config
from kvtier.demo import runner, workloads
from kvtier.demo.flops import prefill_cost
from kvtier.demo.report import WorkloadReport, format_report, plot
from kvtier.engine import CacheEngine
from kvtier.models import load_model


@dataclass
class DemoPlan:
    names: list[str]
    lengths: list[int]
    out: Path


def disk_overrides(args: argparse.Namespace, workload: str, out: Path) -> dict[str, object]:
    """A fresh local disk tier under ``out``, unless disabled, already configured, or not available."""
    cfg = load_config(args)
    if args.no_disk or cfg.disk.enabled or importlib.util.find_spec("kvtier.tiers.disk") is None:
        return {}
    path = out / "disk-cache" / workload
    shutil.rmtree(path, ignore_errors=True)  # every run starts cold: the comparison is within one run
    path.mkdir(parents=True, exist_ok=True)
    return {"disk__enabled": True, "disk__path": str(path)}


def build_requests(
    name: str, args: argparse.Namespace, encode: workloads.Encode, vocab: int, lengths: list[int]
) -> list[workloads.Request]:
    if name == "chat":
        return workloads.chat(
            encode,
            users=args.users,
            rounds=args.rounds,
            system_tokens=args.system_tokens,
            turn_tokens=args.turn_tokens,
        )
    if name == "rag":
        return workloads.rag(
            encode, pool=args.pool, k=args.k, requests=args.rag_requests, doc_tokens=args.rag_doc_tokens
        )
    if name == "docqa":
        return workloads.docqa(encode, docs=args.docs, questions=args.questions, doc_tokens=args.doc_tokens)
    return workloads.context(lengths=lengths, vocab_size=vocab, repeat=args.repeat)


def run_demo(args: argparse.Namespace, plan: DemoPlan) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"kvtier demo: loading {args.model} on {args.device} ...", flush=True)

    lm = load_model(
        args.model, device=args.device, dtype=None if args.dtype == "auto" else dtype_from_name(args.dtype)
    )
    model = lm.model
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model {lm.model_id}: {n_params / 1e6:.0f}M parameters, {next(model.parameters()).dtype}, "
        f"loaded in {lm.load_s:.1f} s; prompts tokenised by "
        f"{'its tokenizer' if lm.tokenizer is not None else 'a word hash (no tokenizer)'}",
        flush=True,
    )
    encode = workloads.make_encoder(lm.tokenizer, vocab)
    all_requests = {n: build_requests(n, args, encode, vocab, plan.lengths) for n in plan.names}
    runner.warm_up(model, vocab)
    cost = prefill_cost(model)
    total = sum(len(r) for r in all_requests.values()) * 2
    bar = tqdm(total=total, desc="requests", unit="req", disable=args.no_progress, file=sys.stderr)
    reports = []
    cuda = next(model.parameters()).device.type == "cuda"
    low_precision = next(model.parameters()).dtype != torch.float32
    for name, reqs in all_requests.items():
        if cuda and not args.no_warmup:
            # CUDA loads kernels lazily and picks GEMM kernels per shape: the first request of a new
            # shape pays up to ~1 s. One untimed pass of both paths keeps that out of the figures.
            bar.set_description(f"{name}: warm-up")
            runner.run_without(model, reqs, gen_tokens=1)
            with CacheEngine(load_config(args, chunk_tokens=args.chunk_tokens)) as scratch:
                runner.run_with(model, reqs, scratch, gen_tokens=1, model_id=lm.model_id)
        cfg = load_config(args, chunk_tokens=args.chunk_tokens, **disk_overrides(args, name, plan.out))
        bar.set_description(f"{name}: without and with kvtier")
        with CacheEngine(cfg) as engine:
            without, with_ = runner.run_interleaved(
                model,
                reqs,
                engine,
                gen_tokens=args.gen_tokens,
                model_id=lm.model_id,
                check_split=low_precision,
                tick=lambda: bar.update(1),
                recompute_ratio=args.recompute_ratio,
            )
            engine.flush(30.0)
            stats = engine.stats()
        reports.append(WorkloadReport(name, without, with_, stats, cost, cfg.chunk.kv_codec))
    bar.close()
    print()
    for rep in reports:
        print(format_report(rep))
        print()
    png = plot(reports, plan.out / "ttft.png", f"kvtier demo: {lm.model_id} on {args.device}")
    print(f"plot: {png}")
    ok = all(r.ok for r in reports)
    if not ok:
        print(
            "kvtier demo: FAILED: outputs with kvtier differ from those without it (beyond the dtype's "
            "rounding, for low-precision runs)",
            file=sys.stderr,
        )
    return 0 if ok else 1
