"""``kvtier stats --url http://127.0.0.1:8080``: a running daemon's statistics as a table."""

from __future__ import annotations

import argparse
import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvtier.commands.user_errors import CommandError
from kvtier.config import format_size
from kvtier.redact import redact_url
from kvtier.server.stats_client import fetch_stats


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stats", help="print a running daemon's statistics", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8080", help="the daemon's HTTP address")
    p.add_argument("--auth-token-file", metavar="FILE", help="token file, if the daemon has one")
    p.add_argument("--json", action="store_true", help="print the raw JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    p.set_defaults(func=run)


def format_table(stats: dict[str, dict[str, Any]]) -> str:
    """Server counters as ``name value`` lines, then one row per tier."""
    lines = []
    server = stats.get("server", {})
    width = max((len(k) for k in server), default=0)
    for k, v in server.items():
        lines.append(
            f"{k:<{width}}  {v:.1f}"
            if isinstance(v, float) and not v.is_integer()
            else f"{k:<{width}}  {int(v)}"
        )
    cols = ("chunks", "bytes_used", "capacity_bytes", "hits", "misses", "puts", "evictions", "errors")
    tiers = {k.removeprefix("tier:"): v for k, v in stats.items() if k.startswith("tier:")}
    if tiers:
        lines.append("")
        lines.append(f"{'tier':<8}" + "".join(f"{c:>15}" for c in cols))
        for name, t in tiers.items():
            cells = [
                format_size(int(t.get(c, 0))) if c.endswith("bytes") and t.get(c) else str(int(t.get(c, 0)))
                for c in cols
            ]
            lines.append(f"{name:<8}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    token = ""
    if args.auth_token_file:
        try:
            token = Path(args.auth_token_file).read_text().strip()
        except OSError as e:
            raise CommandError(
                f"auth token file {args.auth_token_file}: {e.strerror} — pass the file the "
                "daemon's --auth-token-file names"
            ) from e
    url = redact_url(args.url)
    try:
        stats = fetch_stats(args.url, token, args.timeout)
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace").strip()
        fix = " — pass --auth-token-file" if e.code == 401 else ""
        raise CommandError(f"{url} answered {e.code}: {body}{fix}") from e
    except (http.client.HTTPException, json.JSONDecodeError, UnicodeDecodeError) as e:
        # NOTE: the protocol port answers an HTTP request with bytes that are no HTTP (or closes).
        raise CommandError(
            f"{url} is not the daemon's HTTP face ({type(e).__name__}) — is this the protocol "
            "port? use the HTTP port (server.http_port, default 8080)"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CommandError(
            f"cannot read stats from {url}: {reason} — is 'kvtier server' running there? "
            "(--url is its HTTP address, default http://127.0.0.1:8080)"
        ) from e
    print(json.dumps(stats, indent=2) if args.json else format_table(stats))
    return 0
