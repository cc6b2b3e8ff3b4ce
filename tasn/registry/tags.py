"""What the registry records on a model version, by name: evaluation metrics, lineage, promotions.

A version's gate metric (`register.primary_metric`), data version and git commit are version tags,
so the gate compares what the registry itself recorded when the version was made, not a file that
may have moved on. The other evaluation metrics are not copied into tags: `tasn evaluate` logs
them on the version's LoggedModel, and MLflow shows them on the version's page from there. No
MLflow import here: the gate's rule (tasn.registry.gate) works on these values alone.
"""

from __future__ import annotations

import math
from typing import Any

METRIC_TAG = "metric."  # metric.<key> = repr(float): exact round trip
DATA_VERSION_TAG = "data_version"
GIT_COMMIT_TAG = "git_commit"
RUN_ID_TAG = "run_id"
PROMOTION_TAG = "promotion."  # promotion.<seq, 6 digits> = the JSON record of one promotion
SEQ_TAG = "promotion_seq"  # registered-model tag: the last sequence number handed out
PRODUCTION = "production"
UNKNOWN = "unknown"  # a data version, commit or user that was not recorded


def metric_tags(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, str]:
    """Finite numbers of a flat metrics dict (of `keys` only, when given) as `metric.<key>` tags
    (repr: exact round trip)."""
    tags = {}
    for key, value in metrics.items():
        if keys is not None and key not in keys:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            tags[METRIC_TAG + key] = repr(float(value))
    return tags
