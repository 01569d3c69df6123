"""``kvtier server``: run the cache as its own process (see ``kvtier.server.daemon``).

Flags mirror the configuration and win over it (``--cpu-size`` is ``cpu.max_bytes``,
``--disk-path`` turns the disk tier on, ...). It binds 127.0.0.1 unless ``--host`` says
otherwise, and refuses a non-loopback address without ``--auth-token-file``.
"""

from __future__ import annotations

import argparse
import errno

from kvtier.cli_args import add_config_args, load_config
from kvtier.commands.user_errors import CommandError
from kvtier.config import POLICY_NAMES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "server",
        help="run the standalone cache daemon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--cpu-size", metavar="SIZE", help="CPU pool size, e.g. 20GiB (cpu.max_bytes)")
    p.add_argument("--disk-path", metavar="DIR", help="enable the disk tier in DIR (disk.path)")
    p.add_argument("--disk-size", metavar="SIZE", help="disk tier size, e.g. 500GiB (disk.max_disk_bytes)")
    p.add_argument("--remote", metavar="URL", help="a remote tier below: redis://, s3://... (remote.url)")
    p.add_argument(
        "--eviction-policy",
        choices=POLICY_NAMES,
        type=str.lower,
        help="eviction policy of the CPU and disk tiers, any case (cpu.eviction_policy: lru)",
    )
    p.add_argument(
        "--chunk-tokens",
        "--chunk-size",
        dest="chunk_tokens",
        type=int,
        help="tokens per chunk, for POST /lookup (chunk.chunk_tokens)",
    )
    p.add_argument("--host", help="address to bind (server.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="protocol port (server.port, default 5555; 0 = any free)")
    p.add_argument("--http-port", type=int, help="HTTP port (server.http_port, default 8080; 0 = any free)")
    p.add_argument("--auth-token-file", metavar="FILE", help="file holding the token clients must present")
    p.add_argument(
        "--lease-timeout",
        type=float,
        metavar="S",
        help="seconds a client may hold a chunk or reservation (cpu.pin_timeout_s)",
    )
    p.add_argument("--shm-dir", metavar="DIR", help="where the shared pool segment lives (server.shm_dir)")
    p.add_argument("--ready-file", metavar="FILE", help="write {pid, host, port, http_port} here when ready")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.server.daemon import Daemon

    extra: dict[str, object] = {
        "cpu.max_bytes": args.cpu_size,
        "disk.path": args.disk_path,
        "disk.enabled": True if args.disk_path else None,
        "disk.max_disk_bytes": args.disk_size,
        "remote.url": args.remote,
        "cpu.eviction_policy": args.eviction_policy,
        "disk.eviction_policy": args.eviction_policy,
        "chunk.chunk_tokens": args.chunk_tokens,
        "server.host": args.host,
        "server.port": args.port,
        "server.http_port": args.http_port,
        "server.auth_token_file": args.auth_token_file,
        "server.shm_dir": args.shm_dir,
        "cpu.pin_timeout_s": args.lease_timeout,
    }
    cfg = load_config(args, **extra)  # a ConfigError is a one-line user error (kvtier.cli)
    try:
        daemon = Daemon(
            cfg,
            ready_file=args.ready_file,
            shm_dir=cfg.server.shm_dir,
            max_payload_bytes=cfg.server.max_payload_bytes,
        )
    except OSError as e:
        raise CommandError(
            f"cannot start: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
        ) from e
    try:
        daemon.run()
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise CommandError(f"cannot serve: {e.strerror or e}") from e
        # The protocol port is bound first: if it was, the HTTP port is the one taken.
        which, flag, port = (
            ("HTTP", "--http-port", cfg.server.http_port)
            if daemon.port
            else ("protocol", "--port", cfg.server.port)
        )
        raise CommandError(
            f"{which} port {cfg.server.host}:{port} is already in use — stop what holds it "
            f"or pick another with {flag} (0 = any free port)"
        ) from e
    return 0
