"""``kvtier warm``: pre-compute and store the KV of a document corpus (RAG) before traffic.

Documents come from text files (one document each), folders of them and JSONL files (one record
per line, its --text-field). In process, a model computes each document's KV and kvtier stores
it in the configured tiers, which must outlive the run (a disk tier, a kvtier daemon, Redis or
S3): as prefix chunks (--mode prefix: a prompt that starts with the document hits) or as blend
segments (--mode segments: a blended RAG prompt reuses the document wherever it appears).
With --url, each document is sent to an OpenAI-compatible server (max_tokens=1) whose kvtier
connector stores it. Documents already stored are skipped, so an interrupted run resumes (in
process: the engine's lookup; with --url: the --state file). Prints documents, tokens and the
chunks and bytes stored per tier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.cli_args import add_config_args, load_config
from kvtier.commands.user_errors import CommandError

if TYPE_CHECKING:
    from kvtier.warm import Document, WarmReport

Tick = Callable[["Document", int], None]
DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "warm",
        help="pre-compute and store the KV of a corpus of documents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  kvtier warm docs/ --disk-path /var/cache/kvtier\n"
        "  kvtier warm corpus.jsonl --mode segments --set remote.url=kvtier://127.0.0.1:5555\n"
        "  kvtier warm corpus.jsonl --url http://127.0.0.1:8000/v1 --state warm.state "
        "--stats-url http://127.0.0.1:8080",
    )
    p.add_argument("corpus", nargs="+", help="text files, folders of them, or .jsonl files")
    p.add_argument("--text-field", default="text", help="JSONL: the field holding a document's text")
    p.add_argument(
        "--mode",
        choices=("prefix", "segments"),
        default="prefix",
        help="store documents as prefix chunks or as blend segments (in process only)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="in process: cut documents to this many tokens (0: the model's context)",
    )
    m = p.add_argument_group("in process")
    m.add_argument("--model", default="smollm2", help="smollm2, a local HF model directory, or random:NAME")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    m.add_argument(
        "--dtype", choices=sorted(DTYPES), default="auto", help="auto: float32 on CPU, bfloat16 on CUDA"
    )
    m.add_argument(
        "--chunk-tokens", "--chunk-size", dest="chunk_tokens", type=int, default=None,
        help="tokens per chunk (default: the config's, 256); must match the engines that will read",
    )  # fmt: skip
    m.add_argument(
        "--disk-path", metavar="DIR", help="store into a disk tier at DIR (= --set disk.enabled=true ...)"
    )
    h = p.add_argument_group("through a server (--url)")
    h.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    h.add_argument("--server-model", help="the request's model name (default: the first of /models)")
    h.add_argument("--api-key", help="sent as Authorization: Bearer KEY (default: $OPENAI_API_KEY, if set)")
    h.add_argument("--state", metavar="FILE", help="resume file: documents done are listed and skipped")
    h.add_argument("--stats-url", help="the kvtier daemon's HTTP address, for the bytes per tier")
    add_config_args(p)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvtier.warm import read_corpus

    docs = list(read_corpus(args.corpus, text_field=args.text_field))  # bad files fail before any work
    if not docs:
        raise CommandError(f"{' '.join(args.corpus)}: no documents (every file is empty) — check the corpus")
    bar = tqdm(total=len(docs), desc="warm", unit="doc", disable=args.no_progress, file=sys.stderr)

    def tick(_doc: Document, tokens: int) -> None:
        bar.update(1)
        bar.set_postfix(tokens=tokens, refresh=False)

    try:
        rep = _over_http(args, docs, tick) if args.url else _in_process(args, docs, tick)
    finally:
        bar.close()
    for line in rep.lines():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    return 0


def _over_http(args: argparse.Namespace, docs: list[Document], tick: Tick) -> WarmReport:
    from kvtier.warm.http import warm_over_http

    if args.mode != "prefix":
        raise CommandError(
            "--mode segments needs the in-process engine — vLLM's connector reuses prefixes only; drop --url"
        )
    stats = None
    if args.stats_url:
        from kvtier.server.stats_client import fetch_stats

        url = args.stats_url
        stats = lambda: fetch_stats(url)  # noqa: E731
    return warm_over_http(
        args.url,
        docs,
        model=args.server_model or "",
        state=Path(args.state) if args.state else None,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY", ""),
        stats=stats,
        tick=tick,
    )


def _in_process(args: argparse.Namespace, docs: list[Document], tick: Tick) -> WarmReport:
    import torch

    from kvtier.commands.demo_cmd import check_model_and_device
    from kvtier.engine import CacheEngine
    from kvtier.models import load_model
    from kvtier.warm.inproc import warm

    extra: dict[str, object] = {"chunk_tokens": args.chunk_tokens}
    if args.disk_path:
        extra.update({"disk.enabled": "true", "disk.path": args.disk_path})
    cfg = load_config(args, **extra)
    if not cfg.disk.enabled and not cfg.remote.url:
        raise CommandError(
            "the configuration keeps KV only in this process's memory, which ends with the run — "
            "store into a tier that outlives it: --disk-path DIR, or --set remote.url=kvtier://HOST:PORT "
            "(a kvtier daemon), redis://... or s3://..."
        )
    check_model_and_device(args.model, args.device)
    if args.no_progress:  # transformers' own bars ("Loading weights") too: no \r lines in log files
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dtype = DTYPES[args.dtype]
    lm = load_model(args.model, device=args.device, dtype=getattr(torch, dtype) if dtype else None)
    engine = CacheEngine(cfg)
    try:
        return warm(
            engine,
            lm.model,
            lm.tokenizer,
            docs,
            mode=args.mode,
            model_id=lm.model_id,
            max_tokens=args.max_tokens,
            tick=tick,
        )
    finally:
        engine.close()
