"""Turning an exception that reached ``kvtier.cli.main`` into the one line a user sees.

Invariant: a user error (bad flag value, config, URL, a missing optional package, a server that
is not there) prints ``kvtier <cmd>: <what> — <how to fix>`` and exits 2; anything else is a bug
and keeps its traceback (always with ``-v``; without it, a one-line summary that says how to get
the traceback, exit 1). Every line passes ``redact_text``: no URL password reaches the terminal.
"""

from __future__ import annotations

from kvtier.errors import KVTierError
from kvtier.redact import redact_text

__all__ = ["EXTRAS", "CommandError", "missing_module_message", "user_error"]

EXTRAS: dict[str, str] = {
    "redis": "redis",
    "hiredis": "redis",
    "boto3": "s3",
    "mooncake": "mooncake",
    "botocore": "s3",
    "transformers": "transformers",
    "accelerate": "transformers",
    "gguf": "transformers",
    "safetensors": "transformers",
    "matplotlib": "transformers",
    "zstandard": "compress",
    "lz4": "compress",
    "triton": "gpu",
    "vllm": "vllm",
    "aiohttp": "router",
}
"""Top-level module -> the ``pip install 'kvtier[EXTRA]'`` extra that brings it (pyproject)."""


def missing_module_message(name: str | None) -> str | None:
    """The fix for a missing optional module, or None if it is not one of kvtier's extras."""
    root = (name or "").partition(".")[0]
    extra = EXTRAS.get(root)
    if extra is None:
        return None
    return f"needs the optional package {root!r}, which is not installed — pip install 'kvtier[{extra}]'"


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``exc`` is a bug."""
    if isinstance(exc, ModuleNotFoundError):
        return missing_module_message(exc.name)
    if isinstance(exc, KVTierError):
        return redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return None


class CommandError(KVTierError, ValueError):
    """A user error a sub-command found itself (a server not listening, a bad flag value)."""
