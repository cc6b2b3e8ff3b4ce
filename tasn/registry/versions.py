"""Model versions in the MLflow Model Registry: the client, registering a run's model, reading a
version, its alias holder and its metric tags, and keeping the descriptions (`describe`) current.

Uses MLflow's current tracking/registry URI unless given a client (`tasn.tracking.setup` sets it).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from datetime import datetime, timezone
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tasn import lineage, tracking
from tasn.errors import RegistryError
from tasn.registry import describe
from tasn.registry.gate import Standing
from tasn.registry.tags import DATA_VERSION_TAG, GIT_COMMIT_TAG, METRIC_TAG, RUN_ID_TAG, UNKNOWN, metric_tags

log = logging.getLogger(__name__)
ATTEMPT_TAG = "register.attempt"  # the registration attempt that made a version (tasn.registry.stage)


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An MlflowClient on `tracking_uri` (else MLflow's current one) for tracking and registry."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def error_code(exc: MlflowException) -> str:
    return getattr(exc, "error_code", "") or ""


def actor() -> str:
    """Who is promoting: $TASN_USER (set it in CI / pipelines), else the login name, plus host."""
    user = os.environ.get("TASN_USER")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = UNKNOWN
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def register_version(
    run_id: str,
    model_uri: str,
    metrics: dict[str, Any],
    name: str,
    *,
    primary_metric: str = "master_aux_top1",
    data_version_tag: str = tracking.DATA_VERSION_TAG,
    git_commit_tags: tuple[str, ...] = ("git.commit", tracking.GIT_COMMIT_TAG),
    attempt: str | None = None,
) -> ModelVersion:
    """Register `model_uri` (logged by run `run_id`) as a new version of `name`, tagged with its
    `primary_metric` (what the gate compares; `tasn.registry.tags`), the data version (the run's
    tag `data_version_tag`, set by `tasn train`), the git commit (the run's `git.commit` tag,
    which runs logged before MLflow's own tag was set explicitly carry, else
    `mlflow.source.git.commit`, else this checkout's HEAD) and the run's Kubeflow run / DVC
    experiment tags; described in words (`describe.version_description`, with `primary_metric` as
    the headline), and the registered model's description brought up to date. Idempotent: the
    version a KFP run, or the registration `attempt` (`tasn.registry.stage`), registered for this
    run before is returned instead of a second one."""
    mc = client()
    try:
        run = mc.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id!r} not found on {mc.tracking_uri}: {exc.message}") from exc
    run_tags = run.data.tags
    tags = metric_tags(metrics, keys=(primary_metric,))  # the gate's; the rest are on the LoggedModel (tags.py)
    if not tags:
        raise RegistryError(f"no numeric {primary_metric} (register.primary_metric) to register for run {run_id} "
                            f"(got keys {sorted(metrics)})")
    tags[DATA_VERSION_TAG] = run_tags.get(data_version_tag) or UNKNOWN
    commit = next((run_tags[t] for t in git_commit_tags if run_tags.get(t)), None)
    tags[GIT_COMMIT_TAG] = commit or lineage.git_commit() or UNKNOWN
    tags[RUN_ID_TAG] = run_id
    context = {t: run_tags[t] for t in (tracking.KFP_RUN_TAG, tracking.DVC_EXP_TAG) if run_tags.get(t)}
    kfp_run = os.environ.get(lineage.KFP_RUN_ID_ENV)
    if kfp_run:  # a pipeline task, which KFP may retry after it registered: no second version
        context[lineage.KFP_RUN_TAG] = kfp_run
    again = {k: v for k, v in ((lineage.KFP_RUN_TAG, kfp_run), (ATTEMPT_TAG, attempt)) if v}
    for key, value in again.items():
        earlier = registered_before(mc, name, run_id, key, value)
        if earlier is not None:
            log.info("run %s is registered as %s version %s already (%s %s): reusing it", run_id, name,
                     earlier.version, key, value)
            return earlier
    tags.update(context)
    if attempt:
        tags[ATTEMPT_TAG] = attempt
    try:
        mv = mlflow.register_model(model_uri, name, tags=tags)
        text = describe.version_description(
            params=run.data.params, run_name=run.info.run_name or run_id, run_id=run_id,
            data_version=tags[DATA_VERSION_TAG], metrics=metrics, primary_metric=primary_metric,
            commit=tags[GIT_COMMIT_TAG], context=context)
        mv = mc.update_model_version(name, str(mv.version), description=text)
        refresh_model_description(mc, name)
    except MlflowException as exc:
        raise RegistryError(f"registering {model_uri} as {name!r} failed: {exc.message}") from exc
    log.info("registered %s as %s version %s", model_uri, name, mv.version)
    return mv


def registered_before(mc: MlflowClient, name: str, run_id: str, tag: str, value: str) -> ModelVersion | None:
    """The first version of `name` registered for training run `run_id` with version tag `tag` =
    `value` (the KFP run that registered it, or the registration attempt), if any."""
    found = [mv for mv in mc.search_model_versions(f"name='{name}' and run_id='{run_id}'")
             if mv.tags.get(tag) == value]
    return min(found, key=lambda mv: int(mv.version)) if found else None


def refresh_model_description(mc: MlflowClient, name: str) -> None:
    """Rewrite the registered model's description with who holds each alias now."""
    aliases = mc.get_registered_model(name).aliases or {}
    holders = {alias: (str(v), get_version(mc, name, v).tags.get(DATA_VERSION_TAG, UNKNOWN))
               for alias, v in aliases.items()}
    mc.update_registered_model(name, description=describe.model_description(name, holders))


def add_description_line(mc: MlflowClient, name: str, version: str, line: str) -> None:
    """Append one line under the version's promotions (`describe.with_line`)."""
    mv = get_version(mc, name, version)
    mc.update_model_version(name, version, description=describe.with_line(mv.description, line))


def get_version(mc: MlflowClient, name: str, version: str | int) -> ModelVersion:
    try:
        return mc.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} version {version} not found: {exc.message}") from exc


def alias_holder(mc: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The ModelVersion holding `alias`, or None."""
    try:
        return mc.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_metric(mv: ModelVersion, metric: str) -> float:
    """The version's `metric.<metric>` tag as a float; a clear error naming what tags exist."""
    raw = mv.tags.get(METRIC_TAG + metric)
    if raw is None:
        have = sorted(k[len(METRIC_TAG):] for k in mv.tags if k.startswith(METRIC_TAG))
        raise RegistryError(
            f"model {mv.name!r} version {mv.version} has no tag {METRIC_TAG}{metric} "
            f"(its metric tags: {', '.join(have) or 'none'}); register it with `tasn register` "
            "or set register.primary_metric"
        )
    try:
        return float(raw)
    except ValueError as exc:
        raise RegistryError(
            f"model {mv.name!r} version {mv.version}: tag {METRIC_TAG}{metric}={raw!r} is not a number") from exc


def standing(mv: ModelVersion, metric: str, *, required: bool = False) -> Standing:
    """What the gate needs of a version: its number, its primary metric (None when missing,
    unless `required`) and its data version."""
    try:
        value: float | None = version_metric(mv, metric)
    except RegistryError:
        if required:
            raise
        value = None
    return Standing(str(mv.version), value, mv.tags.get(DATA_VERSION_TAG, UNKNOWN))
