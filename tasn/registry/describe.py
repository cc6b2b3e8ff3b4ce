"""The registry in words: the descriptions MLflow shows on the registered model and each version.

A version's description says what it is (model kind, backbone, out size, the run that trained
it), what data it was evaluated on (the data version), its headline metric, the context it came
from (Kubeflow run, DVC experiment, commit) and, one line each, how it was promoted (or lost an
alias). The registered model's description says what the model is, how to serve it, how versions
get promoted, and who holds each alias now; `tasn register` and every promotion rewrite it. Pure
functions of plain values, so the text is tested without a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tasn.tracking import DVC_EXP_TAG, KFP_RUN_TAG

PROMOTIONS = "Promotions:"  # the heading the promotion lines of a version's description follow


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def version_description(*, params: Mapping[str, str], run_name: str, run_id: str, data_version: str,
                        metrics: Mapping[str, Any], primary_metric: str, commit: str,
                        context: Mapping[str, str]) -> str:
    """A new version's description (markdown)."""
    kind, backbone, out_size = (params.get(k, "?") for k in ("model.kind", "model.backbone", "model.out_size"))
    origin = [f"commit `{commit}`"]
    if context.get(KFP_RUN_TAG):
        origin.append(f"Kubeflow run `{context[KFP_RUN_TAG]}`")
    if context.get(DVC_EXP_TAG):
        origin.append(f"DVC experiment `{context[DVC_EXP_TAG]}`")
    lines = [
        f"**{kind}** `{backbone}`, out size {out_size} px, trained by run `{run_name}` (`{run_id}`).",
        f"Data version `{data_version}`: test {primary_metric} **{_number(metrics.get(primary_metric))}** "
        f"(top-1 {_number(metrics.get('top1'))}, top-5 {_number(metrics.get('top5'))}, "
        f"{int(metrics.get('num_test', 0))} test images).",
        f"From {', '.join(origin)}.",
        "",
        PROMOTIONS,
    ]
    return "\n".join(lines)


def promotion_line(record: Mapping[str, Any]) -> str:
    """One promotion as a version's description lists it: when, which alias, who, and why."""
    how = "forced" if record.get("forced") else "by the gate"
    return (f"- {record['when']}: took `@{record['alias']}` (promotion #{record['seq']}, {how}, "
            f"by {record['who']}): {record['why']}")


def displaced_line(record: Mapping[str, Any]) -> str:
    """The line the previous holder of an alias gets when it moves on."""
    return (f"- {record['when']}: `@{record['alias']}` moved on to version {record['version']} "
            f"(promotion #{record['seq']})")


def with_line(description: str | None, line: str) -> str:
    """`description` with `line` appended under its promotions heading (added if missing)."""
    text = (description or "").rstrip()
    if PROMOTIONS not in text:
        text = f"{text}\n\n{PROMOTIONS}" if text else PROMOTIONS
    return f"{text}\n{line}"


def model_description(name: str, holders: Mapping[str, tuple[str, str]]) -> str:
    """The registered model's description; `holders` maps alias -> (version, its data version)."""
    now = "; ".join(f"`@{alias}` = version {v} (data version `{data}`)" for alias, (v, data) in sorted(holders.items()))
    return "\n".join([
        "TASN (Trilinear Attention Sampling Network, CVPR 2019): a fine-grained image classifier, "
        "trained and registered by the tasn pipeline.",
        "",
        f"Serve it with `mlflow models serve -m models:/{name}@staging --env-manager local` and POST images to "
        "`/invocations` (`dataframe_records` of `image`, the base64 bytes of a JPEG or PNG, or `path`): each answer "
        "has `class_id`, `class_name`, `prob` and the top k.",
        "",
        "Every version is registered by `tasn register` with its test metrics. `@staging` moves only through the "
        "champion/challenger gate (a strictly better test `register.primary_metric` on the same data version, or a "
        "forced promotion with a reason), `@production` only from `@staging`; each version's description lists "
        "its promotions.",
        "",
        f"Now: {now or 'no alias is set yet'}.",
    ])
