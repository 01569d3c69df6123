"""Flags shared by sub-commands: ``--config`` and repeated ``--set section.field=value``.

Below ``commands``, ``bench`` and ``demo`` (each of which parses them), so that the apps never
import the command layer that dispatches to them.
"""

from __future__ import annotations

import argparse

from kvtier.config import Config, ConfigError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: $KVTIER_CONFIG)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one value, e.g. --set cpu.max_bytes=8GiB (repeatable)",
    )


def load_config(args: argparse.Namespace, **extra: object) -> Config:
    """The effective Config: file < env < --set < ``extra`` (command-specific flags)."""
    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return Config.load(args.config, env=None, **overrides)
