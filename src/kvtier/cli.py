"""``kvtier`` command line: one sub-command per module, each with its own ``--help``.

A sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func(args) -> int`` as the default. Modules are imported lazily by name so ``kvtier --help``
stays fast and a missing optional extra only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvtier import __version__

COMMAND_MODULES = (
    "kvtier.commands.bench_cmd",
    "kvtier.commands.config_cmd",
    "kvtier.commands.demo_cmd",
    "kvtier.commands.server_cmd",
    "kvtier.commands.stats_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache layer for LLM inference. It stores the attention KV "
        "of prompts in CPU memory, local disk and remote stores and hands it back when the same "
        "text returns, so the engine skips that prefill.",
        epilog="Configuration: a YAML file (--config or $KVTIER_CONFIG), KVTIER_SECTION__FIELD env vars, "
        "and per-command flags, later ones winning. See 'kvtier config show'.",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
