"""`tasn`: one subcommand per stage, plus data import, registry, predict and pipeline tools.

Each area's subcommands live in `tasn.commands.<area>` and import their stage module only when run,
so `tasn --help` is fast and a command needs only the dependencies of its own stage. A user-facing
error (`tasn.errors.TASNError`), or an OSError from the filesystem, is printed as one line, with
its exit code; no traceback (`-v` logs it). SIGTERM, which Kubernetes and `timeout` send, runs the
same cleanup as Ctrl-C (temporaries removed, worker processes stopped, outputs left as they were)
and exits 143, Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from tasn import __version__
from tasn.commands import data, evaluate, pipeline, predict, registry, train
from tasn.commands.common import common_parser
from tasn.errors import TASNError
from tasn.redact import install_log_redaction, redact_text
from tasn.tracking import refusal

# Modules that each define add_commands(subparsers, common): the order is the order in --help.
COMMAND_MODULES = (data, train, evaluate, registry, predict, pipeline)
log = logging.getLogger("tasn")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that everything that cleans up after Ctrl-C (a
    KeyboardInterrupt) does so after SIGTERM too."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_off_terminal() -> None:
    """Off a terminal (`make run`'s log, `dvc repro`, a pod), a redrawn progress bar is a line per
    frame: MLflow's artifact download bars are switched off there, unless the environment says
    otherwise (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR). tasn's own bars are off there already
    (tasn.training.progress)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


def _error(command: str, message: str) -> None:
    """The one error line, credentials redacted, and a file name that is not UTF-8 (kept by Python
    as lone surrogates) shown escaped rather than failing to print."""
    line = f"{command}: error: {redact_text(message)}"
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_redaction()
    quiet_off_terminal()
    action = getattr(args, f"{args.command}_command", None)  # `data import-cub`, `registry ...`
    name = f"tasn {args.command}" + (f" {action}" if action else "")
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except TASNError as exc:
        refused = refusal(exc)  # an MLflow server's 401/403 behind it: who was refused, and what to set
        detail = f"\n  {refused}" if refused else ""
        _error(name, str(exc) + detail)
        return exc.exit_code
    except OSError as exc:  # the filesystem said no (permissions, a full disk, a file where a folder goes)
        log.debug("%s failed", name, exc_info=True)
        _error(name, str(exc))
        return 1
    except Terminated:
        print(f"{name}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        refused = refusal(exc)
        if refused is None:
            raise
        print(f"{name}: error: {refused}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
