"""``kvtier bench``: does kvtier help on this workload, and by how much?

Runs seeded workloads (``chat``, ``docqa``, ``rag``, ``pressure``) against a target and reports
time to first token (mean/p50/p90/p99), throughput and hit rates per variant:

* in process (default): a transformers model (``--model``), as variants ``without`` (plain
  transformers), ``with`` (through kvtier) and ``capped`` (kvtier's CPU tier limited to
  ``--capacity-tokens`` of KV and nothing else: a stand-in for an engine's own prefix cache of
  that size), interleaved request by request so both see the same machine load;
* over HTTP (``--url``): any OpenAI-compatible server (vLLM, SGLang ...), streaming
  ``/completions``; run it once against a server without kvtier and once with it, then
  ``--compare A.json B.json``. ``--stats-url`` adds the kvtier daemon's hit rate.

Size the workloads so the working set exceeds the engine's own prefix cache (``pressure``),
or you are measuring the engine's cache, not kvtier.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kvtier.cli_args import add_config_args
from kvtier.commands.user_errors import CommandError
from kvtier.redact import redact_text, redact_url

EPILOG = """examples:
  kvtier bench                                    # all workloads, SmolLM2 in process, without vs with kvtier
  kvtier bench --workloads pressure --variants without,capped,with --capacity-tokens 2048
  kvtier bench --url http://127.0.0.1:8000/v1 --label vllm --json vllm.json
  kvtier bench --url http://127.0.0.1:8000/v1 --label vllm+kvtier --stats-url http://127.0.0.1:8080 --json kv.json
  kvtier bench --compare vllm.json kv.json --plot-dir plots/"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark workloads with and without kvtier (TTFT, throughput, hits)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    w = p.add_argument_group("workloads (seeded: same flags => same token ids)")
    w.add_argument("--workloads", default="chat,docqa,rag,pressure", help="comma list (default: all four)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request (8)")
    w.add_argument("--users", type=int, default=4, help="chat: users sharing the system prompt (4)")
    w.add_argument(
        "--rounds", type=int, default=3, help="chat: rounds per user, each resending the history (3)"
    )
    w.add_argument("--system-tokens", type=int, default=300, help="chat: system prompt tokens (300)")
    w.add_argument("--turn-tokens", type=int, default=60, help="chat: tokens per simulated answer (60)")
    w.add_argument(
        "--private-tokens",
        type=int,
        default=0,
        help="chat: tokens of each user's private document, sent after the system prompt (0: none)",
    )
    w.add_argument(
        "--turn-order",
        choices=("rounds", "random"),
        default="rounds",
        help="chat: round-major (rounds) or users' turns interleaved in a seeded random order (random)",
    )
    w.add_argument("--docs", type=int, default=3, help="docqa: documents (3)")
    w.add_argument("--doc-tokens", type=int, default=1000, help="docqa: tokens per document (1000)")
    w.add_argument("--questions", type=int, default=3, help="docqa: questions per document (3)")
    w.add_argument(
        "--order", choices=("random", "tiled", "interleaved"), default="random", help="docqa order"
    )
    w.add_argument("--pool", type=int, default=8, help="rag: documents in the pool (8)")
    w.add_argument("--rag-doc-tokens", type=int, default=300, help="rag: tokens per document (300)")
    w.add_argument("--k", type=int, default=3, help="rag: documents per request (3)")
    w.add_argument("--rag-requests", type=int, default=12, help="rag: requests (12)")
    w.add_argument(
        "--capacity-tokens",
        type=int,
        default=2048,
        help="pressure: the engine's own prefix-cache size in tokens; also the 'capped' variant's (2048)",
    )
    w.add_argument("--context-tokens", type=int, default=512, help="pressure: tokens per context (512)")
    w.add_argument("--oversubscribe", type=float, default=1.5, help="pressure: working set / capacity (1.5)")
    w.add_argument("--passes", type=int, default=2, help="pressure: cyclic passes over the contexts (2)")
    t = p.add_argument_group("target")
    t.add_argument(
        "--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (else in process)"
    )
    t.add_argument("--server-model", help="HTTP: the request's model name (default: the first of /models)")
    t.add_argument(
        "--send",
        choices=("ids", "text"),
        default="ids",
        help="HTTP: prompt as token ids (exact reuse; default) or decoded text",
    )
    t.add_argument(
        "--ignore-eos",
        action="store_true",
        help="HTTP: send ignore_eos=true (vLLM, SGLang) so every request decodes --max-tokens",
    )
    t.add_argument(
        "--cache-salt",
        default="",
        help="HTTP: send cache_salt=VALUE (vLLM): the same prompts, but no prefix cached by an earlier run",
    )
    t.add_argument("--concurrency", type=int, default=1, help="HTTP: requests in flight (1)")
    t.add_argument("--label", default="http", help="HTTP: the variant's name in tables and JSON")
    t.add_argument("--stats-url", help="the kvtier daemon's HTTP address, for its hit rate (/stats delta)")
    t.add_argument(
        "--model",
        default="smollm2",
        help="in process: smollm2, a HF model dir or random:NAME; "
        "over HTTP: the tokenizer's source (default smollm2)",
    )
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    t.add_argument(
        "--variants",
        default="without,with",
        help="in process: comma list of without, with, capped, blend (rag: CacheBlend reuse)",
    )
    t.add_argument(
        "--recompute-ratio",
        type=float,
        default=0.15,
        help="blend variant: share of reused document tokens recomputed (0.15; 0 = naive reuse, 1 = exact)",
    )
    t.add_argument(
        "--chunk-tokens",
        "--chunk-size",
        dest="chunk_tokens",
        type=int,
        default=64,
        help="kvtier chunk size (64: the prompts are short)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write every result and summary as JSON")
    o.add_argument("--plot-dir", metavar="DIR", help="write TTFT CDF and TTFT-vs-context PNGs here")
    o.add_argument("--plot-prefix", default="bench", help="PNG file name prefix (bench)")
    o.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="print two runs side by side; no run"
    )
    o.add_argument("--show", metavar="RUN.json", help="print (with --plot-dir: plot) a saved run; no run")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.bench.report import ReportError
    from kvtier.bench.workloads import WorkloadError
    from kvtier.config import ConfigError

    try:
        if args.compare:
            return compare(args)
        if args.show:
            return show(args)
        from kvtier.bench.main import names, run_bench
        from kvtier.bench.workloads import NAMES

        if args.url:
            names(args.workloads, NAMES, "--workloads")  # a bad flag is named before the server is
            probe_server(args.url)
        return run_bench(args)
    except (ReportError, WorkloadError, ConfigError, ValueError) as e:
        print(f"kvtier bench: {redact_text(str(e))}", file=sys.stderr)
        return 2


def probe_server(url: str, timeout_s: float = 10.0) -> None:
    """Raise ``CommandError`` unless something answers HTTP at ``url`` (any status: a 404 for
    ``/models`` still means the server is there); every request would fail otherwise."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CommandError(
            f"cannot reach {redact_url(url)}: {reason} — start the server or fix --url "
            "(an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1)"
        ) from e


def compare(args: argparse.Namespace) -> int:
    from kvtier.bench import report
    from kvtier.bench.plots import plot_all

    pa, pb = Path(args.compare[0]), Path(args.compare[1])
    _, a = report.load(pa)
    _, b = report.load(pb)
    print(report.format_compare(pa.stem, a, pb.stem, b))
    print(report.LEGEND)
    if args.plot_dir:
        merged = report.merge_for_compare(a, b, pa.stem, pb.stem)
        for path in plot_all(merged, Path(args.plot_dir), f"{pa.stem} vs {pb.stem}", args.plot_prefix):
            print(f"plot: {path}")
    return 0


def show(args: argparse.Namespace) -> int:
    from kvtier.bench import report
    from kvtier.bench.plots import plot_all

    doc, runs = report.load(Path(args.show))
    print(f"kvtier bench: {doc.get('target', '?')}; recorded {doc.get('created', '?')}")
    for w in runs:
        print()
        print(report.format_workload(w))
    print(report.LEGEND)
    if args.plot_dir:
        for path in plot_all(
            runs, Path(args.plot_dir), f"kvtier bench: {doc.get('target', '?')}", args.plot_prefix
        ):
            print(f"plot: {path}")
    return 0
