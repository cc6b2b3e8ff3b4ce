"""The champion/challenger rule as a pure function: candidate, incumbent and data versions in, a
verdict out, with no server (the server tests in test_registry.py cover the lock and alias moves)."""

from __future__ import annotations

import pytest

from tasn.errors import RegistryError
from tasn.registry.gate import Standing, judge, require_reason
from tasn.registry.tags import UNKNOWN

ALIAS, METRIC = "staging", "master_aux_top1"


def v(version: str, metric: float | None, data: str = "d1") -> Standing:
    return Standing(version, metric, data)


# (case, candidate, incumbent, decision, words the reason must contain)
CASES = [
    ("better", v("2", 0.75), v("1", 0.5), "promote", ["better", "0.75", "0.5", "data version d1"]),
    ("equal: a tie is not a win", v("2", 0.5), v("1", 0.5), "refuse", ["tie (not a win)", "v2", "v1"]),
    ("worse", v("2", 0.25), v("1", 0.5), "refuse", ["worse", "0.25", "0.5"]),
    ("no incumbent: first promotion", v("1", 0.5), None, "promote", ["no version holds 'staging'", "0.5"]),
    ("different data versions are not comparable", v("2", 0.9, "d2"), v("1", 0.5, "d1"), "refuse",
     ["not comparable", "data version d2", "on d1", "--force --reason"]),
    ("unknown data version against a known one is not comparable", v("2", 0.9, UNKNOWN), v("1", 0.5), "refuse",
     ["not comparable (the data version of v2 is unknown)", f"data version {UNKNOWN}", "--force --reason"]),
    ("a known data version against an unknown incumbent is not comparable", v("2", 0.9), v("1", 0.5, UNKNOWN),
     "refuse", ["not comparable (the data version of v1 is unknown)", f"on {UNKNOWN}"]),
    # Unknown on both sides is not "the same data": nobody recorded what either model saw.
    ("unknown data version on both sides is not comparable", v("2", 0.9, UNKNOWN), v("1", 0.5, UNKNOWN), "refuse",
     ["not comparable (the data version of v2 and v1 is unknown)", "0.9", "0.5", "--force --reason"]),
    ("the legacy 'untracked' tag is an unknown version too", v("2", 0.9, "untracked"), v("1", 0.5, "untracked"),
     "refuse", ["not comparable", "unknown"]),
    ("an empty data version is unknown", v("2", 0.9, ""), v("1", 0.5, ""), "refuse",
     ["not comparable", f"data version {UNKNOWN}"]),
    ("no incumbent: an unknown data version compares with nothing, so it is a first promotion",
     v("1", 0.5, UNKNOWN), None, "promote", ["no version holds 'staging'"]),
    ("the incumbent has no metric", v("2", 0.9), v("1", None), "refuse", ["has no master_aux_top1 tag", "v1"]),
    ("the candidate already holds the alias", v("1", 0.5), v("1", 0.5), "unchanged", ["already holds 'staging'"]),
]


@pytest.mark.parametrize("case,candidate,incumbent,decision,words", CASES, ids=[c[0] for c in CASES])
def test_the_rule(case, candidate, incumbent, decision, words):
    verdict = judge(candidate, incumbent, alias=ALIAS, primary_metric=METRIC)
    assert verdict.decision == decision, verdict.reason
    for word in words:
        assert word in verdict.reason, (word, verdict.reason)


def test_a_forced_promotion_skips_the_comparison_but_not_the_unchanged_check():
    worse, other_data = v("2", 0.1), v("3", None, "d9")
    for candidate in (worse, other_data):
        verdict = judge(candidate, v("1", 0.5), alias=ALIAS, primary_metric=METRIC, forced="rollback")
        assert (verdict.decision, verdict.reason) == ("promote", "forced: rollback")
    held = judge(v("1", 0.5), v("1", 0.5), alias=ALIAS, primary_metric=METRIC, forced="again")
    assert held.decision == "unchanged"


def test_a_candidate_without_the_metric_is_refused_unless_forced():
    assert judge(v("2", None), None, alias=ALIAS, primary_metric=METRIC).decision == "refuse"
    assert judge(v("2", None), None, alias=ALIAS, primary_metric=METRIC, forced="why").decision == "promote"


def test_force_needs_a_reason():
    assert require_reason(False, None) is None
    assert require_reason(True, "  canary passed ") == "canary passed"
    for reason in (None, "", "   "):
        with pytest.raises(RegistryError, match="--force needs --reason"):
            require_reason(True, reason)
