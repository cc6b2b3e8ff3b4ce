"""What every stage command shares: the configuration options, reading the config, JSON output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from tasn.config import DEFAULT_PARAMS, PROFILES_DIR, Config, find_params, load_config
from tasn.redact import redact_text

Subparsers = Any  # argparse's private _SubParsersAction, as add_subparsers returns it


def common_parser() -> argparse.ArgumentParser:
    """Options every stage takes: where params.yaml is, which profile, and overrides."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("configuration")
    group.add_argument("--params", default=None,
                       help=f"params file (default: {DEFAULT_PARAMS} in the working directory if there is one, "
                            "else $TASN_PARAMS (the image's), else the built-in defaults, which are what it holds)")
    group.add_argument("--profile", default=None,
                       help=f"overlay from {PROFILES_DIR}/NAME.yaml next to the params file (e.g. cub, smoke), "
                            "or a path to a .yaml file")
    group.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one value (repeatable), e.g. -S train.lr=0.05",
    )
    return common


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type` for a whole number in [low, high]: anything else is a usage error
    (exit 2) naming the flag's value and the range, not a traceback from deep in a stage."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:50]!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range {low}..{high}")
        return value

    parse.__name__ = "whole number"  # what argparse calls the type in its messages
    return parse


def config_from_args(args: argparse.Namespace) -> Config:
    """The checked config of --params, --profile and -S."""
    return load_config(find_params(args.params), args.profile, args.overrides)


def print_json(obj: Any) -> None:
    """A stage's result on stdout, credentials redacted (`tasn.redact.redact_text`)."""
    print(redact_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))
