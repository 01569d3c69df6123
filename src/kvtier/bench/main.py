"""``kvtier bench`` orchestration: build the target and its tokenizer, the workloads, run, report.

Every workload gets fresh drivers (a fresh kvtier engine per variant), so hit rates and
speedups are per workload and one workload's cache never warms the next.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvtier.bench import report, runner, workloads
from kvtier.bench.drivers import Driver, HttpDriver, TransformersDriver, first_model
from kvtier.bench.plots import plot_all
from kvtier.bench.workloads import WorkloadError
from kvtier.cli_args import load_config

VARIANTS = ("without", "with", "capped", "blend")
LABELS = {
    "without": "without kvtier",
    "with": "with kvtier",
    "capped": "capped (engine-sized)",
    "blend": "kvtier + blend",
}


def names(csv: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    out = [n.strip() for n in csv.split(",") if n.strip()]
    bad = sorted(set(out) - set(allowed))
    if bad or not out:
        raise WorkloadError(f"{flag}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}")
    return out


def build_workloads(args: argparse.Namespace, encode: workloads.Encode) -> list[workloads.Workload]:
    common = dict(max_tokens=args.max_tokens, seed=args.seed)
    kw: dict[str, dict[str, Any]] = {
        "chat": dict(
            users=args.users,
            rounds=args.rounds,
            system_tokens=args.system_tokens,
            turn_tokens=args.turn_tokens,
            private_tokens=args.private_tokens,
            turn_order=args.turn_order,
        ),
        "docqa": dict(docs=args.docs, doc_tokens=args.doc_tokens, questions=args.questions, order=args.order),
        "rag": dict(pool=args.pool, doc_tokens=args.rag_doc_tokens, k=args.k, requests=args.rag_requests),
        "pressure": dict(
            capacity_tokens=args.capacity_tokens,
            context_tokens=args.context_tokens,
            oversubscribe=args.oversubscribe,
            passes=args.passes,
        ),
    }
    return [
        workloads.build(n, encode, **kw[n], **common)
        for n in names(args.workloads, workloads.NAMES, "--workloads")
    ]


def kv_bytes_per_token(model: Any) -> int:
    from kvtier.integrations.hf_cache import model_kv_spec

    s = model_kv_spec(model)
    return s.num_layers * 2 * s.num_kv_heads * s.head_dim * s.dtype.itemsize


class InProcess:
    """A transformers model and a factory of per-workload drivers for the chosen variants."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from kvtier.demo.runner import warm_up
        from kvtier.demo.workloads import make_encoder
        from kvtier.models import load_model

        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.variants = names(args.variants, VARIANTS, "--variants")
        ratio = float(getattr(args, "recompute_ratio", 0.15))
        if not 0.0 <= ratio <= 1.0:
            raise WorkloadError(f"--recompute-ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        load_config(args, chunk_tokens=args.chunk_tokens)  # a bad --set fails before the model loads
        print(f"kvtier bench: loading {args.model} on {args.device} ...", file=sys.stderr, flush=True)
        self.lm = load_model(args.model, device=args.device)
        vocab = int(self.lm.model.config.get_text_config(decoder=True).vocab_size)
        self.encode = make_encoder(self.lm.tokenizer, vocab)
        warm_up(self.lm.model, vocab)
        self.target = f"{self.lm.model_id} on {args.device} (transformers, in process, {torch.get_num_threads()} threads)"

    def drivers(self) -> list[Driver]:
        from kvtier.engine import CacheEngine

        out: list[Driver] = []
        for v in self.variants:
            engine = None
            if v in ("with", "blend"):
                engine = CacheEngine(load_config(self.args, chunk_tokens=self.args.chunk_tokens))
            elif v == "capped":
                chunks = max(1, self.args.capacity_tokens // self.args.chunk_tokens)
                size = chunks * self.args.chunk_tokens * kv_bytes_per_token(self.lm.model)
                engine = CacheEngine(
                    load_config(
                        self.args,
                        chunk_tokens=self.args.chunk_tokens,
                        cpu__max_bytes=size,
                        disk__enabled=False,
                        remote__url="",
                    )
                )
            label = f"{LABELS[v]} {self.ratio:.0%}" if v == "blend" else LABELS[v]
            ratio = self.ratio if v == "blend" else None
            out.append(
                TransformersDriver(
                    label, self.lm.model, engine, model_id=self.lm.model_id, recompute_ratio=ratio
                )
            )
        return out


class OverHttp:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        from kvtier.models import smollm2_dir

        if args.concurrency < 1:
            raise WorkloadError("--concurrency must be >= 1")
        path = smollm2_dir() if args.model == "smollm2" else Path(args.model).expanduser()
        tok = AutoTokenizer.from_pretrained(str(path))
        self.encode = lambda text: list(tok(text, add_special_tokens=False).input_ids)
        self.decode = lambda ids: tok.decode(ids)
        self.model = args.server_model or first_model(args.url)
        self.args = args
        self.target = f"{self.model} at {args.url} (HTTP, concurrency {args.concurrency})"

    def drivers(self) -> list[Driver]:
        a = self.args
        extra: dict[str, Any] = {"ignore_eos": True} if a.ignore_eos else {}
        if a.cache_salt:
            extra["cache_salt"] = a.cache_salt
        return [HttpDriver(a.label, a.url, self.model, send=a.send, decode=self.decode, extra=extra)]


def stats_fetcher(url: str | None) -> runner.StatsFetch | None:
    if not url:
        return None
    from kvtier.server.stats_client import fetch_stats

    return lambda: fetch_stats(url)


def run_bench(args: argparse.Namespace) -> int:
    target: InProcess | OverHttp = OverHttp(args) if args.url else InProcess(args)
    loads = build_workloads(args, target.encode)
    stats = stats_fetcher(args.stats_url)
    n_drivers = len(target.variants) if isinstance(target, InProcess) else 1
    total = sum(len(w.requests) for w in loads) * n_drivers
    bar = tqdm(total=total, desc="requests", unit="req", disable=args.no_progress, file=sys.stderr)
    done: list[report.WorkloadRuns] = []
    for w in loads:
        bar.set_description(w.name)
        drivers = target.drivers()
        try:
            runs = runner.run_workload(
                w,
                drivers,
                concurrency=getattr(args, "concurrency", 1) if args.url else 1,
                stats=stats,
                tick=lambda: bar.update(1),
            )
        finally:
            for d in drivers:
                d.close()
        done.append(report.WorkloadRuns(w.name, w.params, runs))
    bar.close()
    print(f"kvtier bench: {target.target}; host {platform.node()}, {platform.machine()}")
    for wr in done:
        print()
        print(report.format_workload(wr))
    print(report.LEGEND)
    meta = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "target": target.target,
        "driver": "http" if args.url else "transformers",
        "host": platform.node(),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    if args.json:
        report.save(report.to_json(done, meta), Path(args.json))
        print(f"\njson: {args.json}")
    if args.plot_dir:
        for path in plot_all(done, Path(args.plot_dir), f"kvtier bench: {target.target}", args.plot_prefix):
            print(f"plot: {path}")
    failed = sum(r.error is not None for wr in done for run in wr.runs for r in run.results)
    return 1 if failed else 0
