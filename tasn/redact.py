"""Keep credentials out of everything the project writes or prints.

Credentials reach the project two ways: inside URIs (`https://user:token@host`,
`postgresql://user:pw@db/mlflow`) given as config values, `-S` overrides or environment
variables, and as environment variables of their own (`MLFLOW_TRACKING_PASSWORD`,
`AWS_SECRET_ACCESS_KEY`, ...). Whatever leaves the process, MLflow params and tags, run.json, log
records, echoed argv and error lines, goes through one of these functions first: a URI keeps its
scheme and host (the part people need to read) and loses its userinfo; a value whose key or flag
says it is a secret, or that equals the value of a secret environment variable, becomes `***`.

Stdlib only, so any module (and the KFP components' runtime) can import it.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***"

# `scheme://` then userinfo up to its last `@` before the host (a password may hold a raw `@`);
# the userinfo stops at `/`, whitespace, quotes and brackets, so JSON and log text stay intact.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s?#@\"'<>()\[\]{}]*@)+")
# A name that says its value is a secret; `key` only as a word of its own (api_key, SECRET_KEY,
# AWS_ACCESS_KEY_ID), so keep_checkpoints or monkey are not.
_SECRET_NAME = re.compile(r"secret|passw(?:or)?d|token|credential|apikey|(?<![a-z])key(?![a-z])", re.IGNORECASE)
_SECRET_MIN = 6  # shorter values of secret-named variables (`1`, `true`) are not taken for secrets
_SET_FLAGS = ("-S", "--set")  # tasn's override flag (tasn.commands.common)


def redact_uri(text: str) -> str:
    """Every `scheme://userinfo@host` inside `text` -> `scheme://***@host`."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """`https://user:pw@host/x` -> (`https://host/x`, "user", "pw"), percent-decoded; a URI
    without userinfo comes back unchanged with (None, None)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return clean, urllib.parse.unquote(user) or None, urllib.parse.unquote(password) if sep else None


def is_secret_name(name: str) -> bool:
    """Does a key, flag or environment variable name say its value is a secret?"""
    return bool(_SECRET_NAME.search(name))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of secret-named environment variables, longest first (so a secret that
    contains another is replaced whole)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if len(v) >= _SECRET_MIN and is_secret_name(k)}, key=len, reverse=True)


def redact_text(text: str) -> str:
    """`redact_uri`, and every known secret value inside `text` -> `***`."""
    text = redact_uri(text)
    for secret in secret_values():
        text = text.replace(secret, REDACTED)
    return text


def _redact_value(name: str, value: str) -> str:
    """`***` for the value of a secret-named key; otherwise `redact_text`."""
    return REDACTED if value and is_secret_name(name) else redact_text(value)


def redact_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy for MLflow params/tags or a record: secret-named keys -> `***`, other values
    through `redact_text` (a value that needs no change keeps its type)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        text = str(value)
        clean = _redact_value(str(key), text)
        out[key] = value if clean == text else clean
    return out


def redact_tree(value: Any, name: str = "") -> Any:
    """`value` (nested dicts, lists and scalars, e.g. a config as a dict) with every string
    through `_redact_value` under its key's name: what a file that records a config holds (model.pt,
    a checkpoint), so that a `tracking.uri` or `s3_endpoint` with credentials in it is written as
    `scheme://***@host`. Values that need no change keep their type and identity."""
    if isinstance(value, Mapping):
        return {k: redact_tree(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v, name) for v in value)
    if isinstance(value, str):
        return _redact_value(name, value)
    return value


def redact_argv(argv: Sequence[str]) -> list[str]:
    """An argv fit to print: `-S key=value` (also `--set key=value`, `--set=key=value`,
    `-Skey=value`) whose key is secret-named or whose value is a known secret -> `key=***`; the
    value of a secret-named flag (`--password X`, `--token=X`) -> `***`; every item through
    `redact_text`."""
    out: list[str] = []
    pending: str | None = None  # the flag before this item, when it takes this item as its value
    for item in map(str, argv):
        if pending in _SET_FLAGS:
            out.append(_redact_override(item))
        elif pending is not None:
            out.append(REDACTED)
        else:
            out.append(_redact_item(item))
        pending = _value_flag(item) if pending is None else None
    return out


def _redact_item(item: str) -> str:
    if item.startswith("--") and "=" in item:
        flag, _, value = item.partition("=")
        return f"{flag}={_redact_override(value) if flag in _SET_FLAGS else _redact_value(flag, value)}"
    if item.startswith("-S") and len(item) > 2:
        return "-S" + _redact_override(item[2:])
    return _redact_value("", item)


def _value_flag(item: str) -> str | None:
    """`item` if it is a flag whose value (the next item) must be redacted: -S/--set, or a
    secret-named option such as --password."""
    if item in _SET_FLAGS or (item.startswith("-") and "=" not in item and is_secret_name(item)):
        return item
    return None


def _redact_override(item: str) -> str:
    key, eq, value = item.partition("=")
    return f"{key}={_redact_value(key, value)}" if eq else redact_text(item)


def find_credential(name: str, value: Any, by_name: bool = True) -> str | None:
    """Why `value` (under the key or variable `name`) is a credential, or None.

    For what must never be stored in plain text (a KFP run's arguments, a job's env): a URI with
    a user or password, the value of a secret-named key (`by_name`; off for names that hold a
    Secret's *name*, such as `s3_secret`), or the value of one of this process's secret
    environment variables."""
    if not isinstance(value, str) or not value:
        return None
    if redact_uri(value) != value:
        return "a URI with a user or password"
    if by_name and is_secret_name(name):
        return "the value of a secret-named key"
    if value in secret_values():
        return "the value of a secret environment variable here"
    return None


_installed = False


def install_log_redaction() -> None:
    """Format every log record of this process through `redact_text` (its message, and the
    traceback it carries), whichever logger or handler it goes to, MLflow's own included.

    Done in the record factory because MLflow's loggers have handlers of their own and do not
    propagate, so a filter on the root handlers would miss them. Idempotent."""
    global _installed
    if _installed:
        return
    make = logging.getLogRecordFactory()
    formatter = logging.Formatter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging itself reports it when the record is emitted
            return record
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(formatter.formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
