"""The rules a config value must follow, and the one function that enforces them.

A field states its own rule in its annotation: `Literal[...]` for a choice (the names come from
`tasn.choices`), `Annotated[int, Range(ge=0)]` for a bounded number. Every float must be finite, and
every string that is an s3:// URI must name a bucket.
`check` walks a config (or any section of one) and raises `ConfigError` naming the first value that
breaks its field's rule; sections with rules that tie two fields together add a `relations` method.
The loader calls `check` on everything it builds, and each stage function calls it on the section it
is given, so a config built in Python code is held to the same rules as one read from YAML.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from tasn import storage
from tasn.errors import ConfigError, shown


@dataclass(frozen=True)
class Range:
    """Bounds of a number field: `ge`/`gt` below (at least / greater than), `le`/`lt` above."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
        return " and ".join(f"{op} {_number(bound)}" for op, bound in parts if bound is not None)

    def holds(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass, `Annotated` metadata kept (resolved once)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce(value: Any, tp: Any, name: str) -> Any:
    """`value` checked against the annotation `tp` (type, choice, bounds); ints are accepted for
    floats and returned as floats. Raises ConfigError naming `name`."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        value = coerce(value, base, name)
        for rule in meta:
            if isinstance(rule, Range) and not rule.holds(value):
                raise ConfigError(f"{name}: must be {rule.describe()}, got {shown(value)}")
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}: {shown(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {shown(value)}")
        return [coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {shown(value)}")
        return value
    if tp is float:
        if not _is_number(value):
            raise ConfigError(f"{name}: expected float, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {shown(value)}")
        return float(value)
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {shown(value)}")
    if tp is str and storage.is_s3(value):  # any path-like value may be an object-store URI
        problem = storage.s3_problem(value)
        if problem:
            raise ConfigError(f"{name}: {problem}")
    return value


def check(section: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first value of `section` (a config dataclass, sections nested)
    that breaks its field's rule or a `relations` rule of its section."""
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check(value, name + ".")
        else:
            coerce(value, field_types(type(section))[f.name], name)
    relations = getattr(section, "relations", None)
    if relations is not None:
        for problem in relations():
            raise ConfigError(f"{prefix}{problem}")
