"""``kvtier router``: an OpenAI-compatible proxy in front of several engine instances.

Each request goes to the instance whose kvtier daemon holds the longest prefix of its prompt
(``POST /lookup``), then to the least loaded one (``--policy kv-aware``, the default); or
``round-robin``, ``least-load``, ``session`` (sticky by ``--session-header``). A dead instance is
retried elsewhere, a dead daemon only loses its prefix signal. ``--pd prefill=URL,...
decode=URL,...`` runs the prefill/decode two-step instead. Settings, later ones winning: the
``router:`` section of ``--config``, ``KVTIER_ROUTER__FIELD``, ``--set router.FIELD=...``, the
flags below (see ``kvtier config show``).

  kvtier router --backend http://127.0.0.1:8001,lookup=http://127.0.0.1:8081 \\
                --backend http://127.0.0.1:8002,lookup=http://127.0.0.1:8082 --port 8000
"""

from __future__ import annotations

import argparse

from kvtier.cli_args import add_config_args, load_config
from kvtier.commands.user_errors import CommandError
from kvtier.config import ROUTER_POLICIES, RouterConfig

D = RouterConfig()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "router",
        help="route OpenAI requests to the engine instance holding the prompt's KV",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument(
        "--backend",
        action="append",
        metavar="URL[,lookup=DAEMON_URL][,token=FILE]",
        help="an engine instance and its kvtier daemon's HTTP address (repeatable; router.backends)",
    )
    p.add_argument(
        "--pd",
        nargs=2,
        metavar=("prefill=URL,...", "decode=URL,..."),
        help="prefill/decode two-step: max_tokens=1 to a prefill instance, then the request to a decode one",
    )
    p.add_argument("--policy", choices=ROUTER_POLICIES, help=f"routing policy (default: {D.policy})")
    p.add_argument(
        "--fallback-policy",
        choices=("least-load", "round-robin"),
        help=f"used when kv-aware has no prefix answer or session no header (default: {D.fallback_policy})",
    )
    p.add_argument("--session-header", help=f"session policy: the sticky key (default: {D.session_header})")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the served model directory (default: the engines' /v1/models root)",
    )
    p.add_argument("--model-id", help="the /lookup model id (default: that directory, as vLLM's --model)")
    p.add_argument("--kv-dtype", help="the engines' KV dtype (default: config.json's dtype)")
    p.add_argument(
        "--chunk-tokens",
        type=int,
        help="the connector's chunk.chunk_tokens (default: chunk.chunk_tokens, 256)",
    )
    p.add_argument(
        "--lookup-token-file", metavar="FILE", help="the daemons' auth token, for backends without token="
    )
    p.add_argument(
        "--lookup-timeout",
        type=float,
        metavar="S",
        help=f"per /lookup fan-out (default: {D.lookup_timeout_s})",
    )
    p.add_argument(
        "--lookup-strikes",
        type=int,
        metavar="N",
        help="skip a daemon after N lookup timeouts in a row; refused or bad answers: at once "
        f"(default: {D.lookup_strikes})",
    )
    p.add_argument("--connect-timeout", type=float, metavar="S", help=f"default: {D.connect_timeout_s}")
    p.add_argument(
        "--read-timeout", type=float, metavar="S", help=f"idle engine stream (default: {D.read_timeout_s})"
    )
    p.add_argument(
        "--cooldown",
        type=float,
        metavar="S",
        help=f"skip a failed instance or daemon (default: {D.cooldown_s})",
    )
    p.add_argument(
        "--balance-gap",
        type=int,
        metavar="N",
        help=f"kv-aware yields to load at N more in-flight requests (default: {D.balance_gap})",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="do not replay a greedy stream whose instance died"
    )
    p.add_argument("--host", help=f"address to bind (default: {D.listen_host})")
    p.add_argument("--port", type=int, help=f"port (default: {D.listen_port}; 0 = any free)")
    p.set_defaults(func=run)


def pd_pools(values: list[str] | None) -> tuple[str | None, str | None]:
    if not values:
        return None, None
    pools: dict[str, str] = {}
    for v in values:
        key, sep, urls = v.partition("=")
        if key not in ("prefill", "decode") or not sep or not urls or key in pools:
            raise CommandError(f"--pd: expected prefill=URL,... decode=URL,..., got {v!r}")
        pools[key] = urls
    if set(pools) != {"prefill", "decode"}:
        raise CommandError("--pd needs both prefill=URL,... and decode=URL,...")
    return pools["prefill"], pools["decode"]


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from kvtier.router.app import Router

    prefill, decode = pd_pools(args.pd)
    extra: dict[str, object] = {
        "router.backends": " ".join(args.backend) if args.backend else None,
        "router.prefill": prefill,
        "router.decode": decode,
        "router.policy": args.policy,
        "router.fallback_policy": args.fallback_policy,
        "router.session_header": args.session_header,
        "router.tokenizer": args.tokenizer,
        "router.lookup_token_file": args.lookup_token_file,
        "router.lookup_timeout_s": args.lookup_timeout,
        "router.lookup_strikes": args.lookup_strikes,
        "router.connect_timeout_s": args.connect_timeout,
        "router.read_timeout_s": args.read_timeout,
        "router.cooldown_s": args.cooldown,
        "router.balance_gap": args.balance_gap,
        "router.resume_streams": False if args.no_resume else None,
        "router.listen_host": args.host,
        "router.listen_port": args.port,
        "model.model_id": args.model_id,
        "model.kv_dtype": args.kv_dtype,
        "chunk.chunk_tokens": args.chunk_tokens,
    }
    cfg = load_config(args, **extra)
    router = Router(cfg)
    rc = cfg.router
    print(
        f"kvtier router: {rc.policy} over {len(router.backends)} instance(s) on http://{rc.listen_host}:{rc.listen_port}",
        flush=True,
    )
    try:
        web.run_app(
            router.app(),
            host=rc.listen_host,
            port=rc.listen_port,
            print=None,
            access_log=None,
            handle_signals=True,
        )
    except OSError as e:
        raise CommandError(
            f"cannot listen on {rc.listen_host}:{rc.listen_port}: {e.strerror or e} — pick another --port"
        ) from e
    return 0
