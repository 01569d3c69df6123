"""``kvtier config show``: print the effective configuration and where values come from."""

from __future__ import annotations

import argparse
import sys

import yaml

from kvtier.cli_args import add_config_args, load_config
from kvtier.config import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "config",
        help="show the effective configuration",
        description="Show the configuration kvtier would run with: defaults, then the "
        "YAML file, then KVTIER_* environment variables, then --set overrides.",
    )
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the effective config as YAML")
    add_config_args(show)
    show.add_argument("--raw-sizes", action="store_true", help="print sizes as plain byte counts")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    tree = load_config(args).to_dict()  # redacts passwords and URL secrets
    if not args.raw_sizes:
        for section in tree.values():
            for k, v in section.items():
                if k.endswith("_bytes") and isinstance(v, int):
                    section[k] = format_size(v)
    sys.stdout.write(yaml.safe_dump(tree, sort_keys=False))
    return 0
