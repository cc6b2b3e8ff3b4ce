"""`tasn`: one subcommand per stage, plus data import, registry, predict and pipeline tools.

Each area's subcommands live in `tasn.commands.<area>` and import their stage module only when run,
so `tasn --help` is fast and a command needs only the dependencies of its own stage. A user-facing
error (`tasn.errors.TASNError`) is printed as one line, with its exit code; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tasn import __version__
from tasn.commands import data, evaluate, pipeline, predict, registry, train
from tasn.commands.common import common_parser
from tasn.errors import TASNError
from tasn.redact import install_log_redaction, redact_text
from tasn.tracking import refusal

# Modules that each define add_commands(subparsers, common): the order is the order in --help.
COMMAND_MODULES = (data, train, evaluate, registry, predict, pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasn",
        description="TASN: train, evaluate and ship a Trilinear Attention Sampling Network.",
    )
    parser.add_argument("--version", action="version", version=f"tasn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_parser()
    for module in COMMAND_MODULES:
        module.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    try:
        return int(args.func(args) or 0)
    except TASNError as exc:
        refused = refusal(exc)  # an MLflow server's 401/403 behind it: who was refused, and what to set
        detail = f"\n  {refused}" if refused else ""
        print(f"tasn {args.command}: error: {redact_text(str(exc) + detail)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"tasn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        refused = refusal(exc)
        if refused is None:
            raise
        print(f"tasn {args.command}: error: {refused}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
