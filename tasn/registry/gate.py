"""The champion/challenger rule, as a pure function of the candidate, the incumbent and their data.

A candidate takes the alias only if its primary metric is strictly greater than the current
holder's, both evaluated on the same, known data version (a tie is not a win): two unknown versions
are not "the same data", they are data nobody recorded, so the gate refuses rather than compare
them. With no holder the candidate is promoted; a forced promotion needs a reason and skips the
comparison. `judge` decides from the
values alone, so the rule is tested over a table of cases without a server; `tasn.registry.promotion`
reads the values from MLflow, takes the lock and applies the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tasn.errors import RegistryError
from tasn.registry.tags import UNKNOWN

Outcome = Literal["promote", "refuse", "unchanged"]


@dataclass(frozen=True)
class Standing:
    """A model version as the gate sees it."""

    version: str
    metric: float | None  # its primary metric; None when the version has no such tag
    data_version: str  # what it was evaluated on (tags.UNKNOWN when its run did not record it)


@dataclass(frozen=True)
class Verdict:
    decision: Outcome
    reason: str


def require_reason(force: bool, reason: str | None) -> str | None:
    """The stripped reason of a forced promotion (None when not forced); forcing without one is refused."""
    if not force:
        return None
    if not (reason and reason.strip()):
        raise RegistryError("--force needs --reason TEXT: a forced promotion records why")
    return reason.strip()


# What versions registered without a data version carry: `unknown` (tags.UNKNOWN), `untracked` (what
# `tasn train` tagged before it read the version from the prepared data), or nothing at all.
UNKNOWN_DATA = frozenset({UNKNOWN, "untracked", ""})


def known(data_version: str) -> bool:
    return data_version.strip() not in UNKNOWN_DATA


def comparable(candidate_data: str, incumbent_data: str) -> bool:
    """Whether two metrics can be compared: evaluated on the same data version, a known one."""
    return known(candidate_data) and candidate_data == incumbent_data


def judge(candidate: Standing, incumbent: Standing | None, *, alias: str, primary_metric: str,
          forced: str | None = None) -> Verdict:
    """The verdict for `candidate` against the version holding `alias` (None: nobody holds it).
    `forced` is the reason of a forced promotion."""
    if incumbent is not None and incumbent.version == candidate.version:
        return Verdict("unchanged", f"version {candidate.version} already holds {alias!r}")
    if forced is not None:
        return Verdict("promote", f"forced: {forced}")
    if candidate.metric is None:
        return Verdict("refuse", f"candidate v{candidate.version} has no {primary_metric} to compare; "
                                 "promote with --force --reason")
    if incumbent is None:
        return Verdict("promote",
                       f"no version holds {alias!r}: first promotion ({primary_metric} {candidate.metric:.6g})")
    numbers = f"candidate v{candidate.version} {primary_metric}={candidate.metric:.6g}"
    if incumbent.metric is not None:
        numbers += f", {alias} v{incumbent.version} {primary_metric}={incumbent.metric:.6g}"
    if not comparable(candidate.data_version, incumbent.data_version):
        unknown = [f"v{s.version}" for s in (candidate, incumbent) if not known(s.data_version)]
        why = f" (the data version of {' and '.join(unknown)} is unknown)" if unknown else ""
        return Verdict("refuse", f"not comparable{why}: candidate v{candidate.version} was evaluated on data version "
                                 f"{candidate.data_version or UNKNOWN}, {alias} v{incumbent.version} on "
                                 f"{incumbent.data_version or UNKNOWN} ({numbers}); promote with --force --reason")
    if incumbent.metric is None:
        return Verdict("refuse", f"{alias} v{incumbent.version} has no {primary_metric} tag to compare with "
                                 f"({numbers}); promote with --force --reason")
    if candidate.metric > incumbent.metric:
        return Verdict("promote", f"better: {numbers} on data version {candidate.data_version}")
    word = "tie (not a win)" if candidate.metric == incumbent.metric else "worse"
    return Verdict("refuse", f"{word}: {numbers} on data version {candidate.data_version}")
