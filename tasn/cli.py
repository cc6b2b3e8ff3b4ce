"""`tasn`: one subcommand per stage, plus data import, registry and pipeline tools.

Each area's subcommands live in `tasn.commands.<area>` and import their stage module only when run,
so `tasn --help` is fast and a command needs only the dependencies of its own stage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tasn import __version__
from tasn.errors import TASNError

# Modules that each define add_commands(subparsers, common): the order is the order in --help.
COMMAND_MODULES = (
    "tasn.commands.data",
    "tasn.commands.train",
    "tasn.commands.evaluate",
    "tasn.commands.pipeline",
)


def common_parser() -> argparse.ArgumentParser:
    """Options every stage takes: where params.yaml is, which profile, and overrides."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("configuration")
    group.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    group.add_argument("--profile", default=None, help="overlay from `profiles:` in the params file, e.g. demo, cub")
    group.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one value (repeatable), e.g. -S train.lr=0.05",
    )
    return common


def config_from_args(args: argparse.Namespace):
    from tasn.config import load_config

    return load_config(args.params, args.profile, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasn",
        description="TASN: train, evaluate and ship a Trilinear Attention Sampling Network.",
    )
    parser.add_argument("--version", action="version", version=f"tasn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_parser()
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except TASNError as exc:
        print(f"tasn {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tasn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
