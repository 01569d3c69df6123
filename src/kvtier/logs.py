"""Logging setup for kvtier's processes: level, text or JSON lines, secrets redacted.

* Level: ``$KVTIER_LOG_LEVEL`` (``debug``, ``info``, ``warning``, ``error``) wins; else the
  caller's default (``kvtier server`` logs INFO, other commands WARNING; ``-v``/``-vv`` raise it).
* Format: ``text`` (``time LEVEL logger: message``) or ``json`` (one object a line: ``ts``,
  ``level``, ``logger``, ``message``, ``exc_info``), from ``--log-format`` or ``$KVTIER_LOG_FORMAT``.
* Every record passes ``RedactFilter``: any URL in the final message has its password replaced
  by ``***`` (see ``kvtier.redact``), whatever the code that logged it did.

``attach_if_unhandled`` is for library use inside another program (vLLM): it gives the
``kvtier`` logger a handler only when nothing above it would print its records, so kvtier's
INFO lines (layer registration, breaker recovery) appear under ``vllm serve`` without doubling
lines in a program that configured logging itself.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

from kvtier.errors import KVTierError
from kvtier.redact import redact_text

__all__ = [
    "FORMATS",
    "JsonFormatter",
    "RedactFilter",
    "attach_if_unhandled",
    "level_from_env",
    "setup_logging",
]

LEVEL_ENV = "KVTIER_LOG_LEVEL"
FORMAT_ENV = "KVTIER_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class LogSetupError(KVTierError, ValueError):
    """A bad ``KVTIER_LOG_LEVEL`` / ``KVTIER_LOG_FORMAT`` value."""


def level_from_env(default: int, env: dict[str, str] | os._Environ[str] | None = None) -> int:
    """``$KVTIER_LOG_LEVEL`` as a logging level, else ``default``; an unknown name is an error."""
    raw = (os.environ if env is None else env).get(LEVEL_ENV, "").strip().lower()
    if not raw:
        return default
    if raw not in _LEVELS:
        raise LogSetupError(
            f"{LEVEL_ENV}={raw!r}: expected one of {', '.join(sorted(set(_LEVELS) - {'warn'}))}"
        )
    return _LEVELS[raw]


class RedactFilter(logging.Filter):
    """Rewrites each record's message with every URL's password as ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, with tracebacks redacted too (an exception text may hold a URL)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record; keys ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def _handler(fmt: str, stream: TextIO) -> logging.Handler:
    if fmt not in FORMATS:
        raise LogSetupError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactFilter())
    return handler


def setup_logging(level: int, fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Configure the root logger for a kvtier process (replaces handlers set before)."""
    fmt = fmt or os.environ.get(FORMAT_ENV, "").strip().lower() or "text"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_handler(fmt, stream or sys.stderr))
    root.setLevel(level)


def attach_if_unhandled(default_level: int = logging.INFO) -> None:
    """Give the ``kvtier`` logger its own handler when no handler above would show its records."""
    logger = logging.getLogger("kvtier")
    if logger.hasHandlers():
        return
    try:
        level = level_from_env(default_level)
    except LogSetupError as e:
        level = default_level
        print(f"kvtier: {e}; using {logging.getLevelName(level)}", file=sys.stderr)
    fmt = os.environ.get(FORMAT_ENV, "").strip().lower() or "text"
    logger.addHandler(_handler(fmt if fmt in FORMATS else "text", sys.stderr))
    logger.setLevel(level)
    logger.propagate = False
