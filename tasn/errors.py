"""User-facing errors: the CLI prints the message (which names the file or value) and exits 1."""

from __future__ import annotations

import reprlib
from typing import Any

SHOWN_LIMIT = 200  # characters of a value an error message quotes


def _repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = SHOWN_LIMIT - 20, SHOWN_LIMIT - 20, 40
    return r


_REPR = _repr()


def shown(value: Any) -> str:
    """`repr(value)` as an error message quotes it: nested containers, long strings and huge
    numbers cut short, the whole never longer than SHOWN_LIMIT characters, so that a value built
    to be enormous (a YAML alias bomb, a multi-megabyte name) cannot make the message enormous."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit, inside any container
        text = f"<a value too large to show ({type(value).__name__})>"
    return text if len(text) <= SHOWN_LIMIT else text[: SHOWN_LIMIT - 3] + "..."


class TASNError(Exception):
    """A failure the user can act on: bad input, bad config, an unreachable server."""

    exit_code = 1


class DataError(TASNError):
    """The dataset on disk is wrong: the message names each offending file and the rule broken."""


class ServiceError(TASNError):
    """A server (MLflow, S3, Kubeflow) could not be reached or refused the request."""


class ConfigError(TASNError, ValueError):
    """A configuration value, key or file is wrong; the message names it (and the file and line)."""


class RegistryError(TASNError):
    """A registry request names something that is not there or not allowed (version, alias, tag)."""
