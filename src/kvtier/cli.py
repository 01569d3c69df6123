"""``kvtier`` command line: one sub-command per module, each with its own ``--help``.

A sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func(args) -> int`` as the default. Modules are imported lazily by name so ``kvtier --help``
stays fast (no torch: ``kvtier.__version__`` is read from the package metadata) and a missing
optional extra only breaks the command that needs it.

Errors: a user error prints one line ``kvtier <cmd>: <what> — <how to fix>`` and exits 2 (see
``commands.user_errors``); a bug exits 1 with a one-line summary, or its traceback with ``-v``.
Logging: ``$KVTIER_LOG_LEVEL`` / ``-v`` and ``--log-format text|json`` (see ``kvtier.logs``).
Progress bars are off when stderr is not a terminal, so log files hold no ``\\r`` lines.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from kvtier import __version__
from kvtier.logs import FORMATS, LogSetupError, level_from_env, setup_logging

COMMAND_MODULES = (
    "kvtier.commands.bench_cmd",
    "kvtier.commands.config_cmd",
    "kvtier.commands.demo_cmd",
    "kvtier.commands.router_cmd",
    "kvtier.commands.server_cmd",
    "kvtier.commands.stats_cmd",
    "kvtier.commands.warm_cmd",
)
DEFAULT_LEVEL = {
    "server": logging.INFO,
    "router": logging.INFO,
}  # a daemon's log is its record; other commands stay quiet


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps hand-wrapped descriptions and appends ``(default: X)`` to every option whose help
    does not state its default already (``(4)`` or ``default``) and whose default is a value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if (
            not text
            or d is None
            or d is False
            or (isinstance(d, list) and not d)
            or d is argparse.SUPPRESS
            or not action.option_strings
            or "default" in text
            or "%(default)" in text
            or f"({d})" in text
        ):
            return action.help
        return text + " (default: %(default)s)"


def _walk(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out.extend(_walk(child))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: a tiered KV-cache layer for LLM inference. It stores the attention KV "
        "of prompts in CPU memory, local disk and remote stores and hands it back when the same "
        "text returns, so the engine skips that prefill.",
        epilog="Configuration: a YAML file (--config or $KVTIER_CONFIG), KVTIER_SECTION__FIELD env vars, "
        "and per-command flags, later ones winning. See 'kvtier config show'. "
        "Logging: $KVTIER_LOG_LEVEL (debug|info|warning|error), $KVTIER_LOG_FORMAT (text|json).",
    )
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug); show tracebacks"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help="log lines as text or JSON objects (default: $KVTIER_LOG_FORMAT or text)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    for p in _walk(parser):
        p.formatter_class = HelpFormatter
        for action in p._actions:
            if (
                action.help is None
                and action.option_strings
                and action.default is not None
                and action.default is not False
            ):
                action.help = "default: %(default)s"  # argparse prints no help line for help=None
    return parser


def _fail(command: str, message: str) -> None:
    print(f"kvtier {command}: {message}".rstrip(), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or ""
    try:
        default = DEFAULT_LEVEL.get(command, logging.WARNING)
        level = (logging.INFO, logging.DEBUG)[min(args.verbose, 2) - 1] if args.verbose else default
        setup_logging(level_from_env(level) if not args.verbose else level, args.log_format)
    except LogSetupError as e:
        _fail(command, f"{e}")
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True
    if getattr(args, "no_progress", False):
        # transformers/huggingface_hub bars too ("Loading weights"): read when they are imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from kvtier.commands.user_errors import user_error
    from kvtier.redact import redact_text

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _fail(command, "interrupted")
        return 130
    except Exception as e:
        message = user_error(e)
        if args.verbose:
            raise
        if message is not None:
            _fail(command, message)
            return 2
        _fail(
            command,
            f"internal error: {type(e).__name__}: {redact_text(str(e))} (run with -v for the traceback)",
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
