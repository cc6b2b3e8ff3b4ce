"""Model versions in the MLflow Model Registry: the client, registering a run's model, reading a
version, its alias holder and its metric tags.

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

from tasn import lineage
from tasn.errors import RegistryError
from tasn.registry.gate import Standing
from tasn.registry.tags import DATA_VERSION_TAG, GIT_COMMIT_TAG, METRIC_TAG, RUN_ID_TAG, UNKNOWN, metric_tags

log = logging.getLogger(__name__)


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
    data_version_tag: str = "data.version",
    git_commit_tags: tuple[str, ...] = ("git.commit", "mlflow.source.git.commit"),
) -> ModelVersion:
    """Register `model_uri` (logged by run `run_id`) as a new version of `name`, tagged with the
    metrics, the data version (the run's tag `data_version_tag`, set by `tasn train`) and the git
    commit (the run's `git.commit` tag, else MLflow's source tag, else this checkout's HEAD)."""
    mc = client()
    try:
        run = mc.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id!r} not found on {mc.tracking_uri}: {exc.message}") from exc
    run_tags = run.data.tags
    tags = metric_tags(metrics)
    if not tags:
        raise RegistryError(f"no numeric metrics to register for run {run_id} (got keys {sorted(metrics)})")
    tags[DATA_VERSION_TAG] = run_tags.get(data_version_tag) or UNKNOWN
    commit = next((run_tags[t] for t in git_commit_tags if run_tags.get(t)), None)
    tags[GIT_COMMIT_TAG] = commit or lineage.git_commit() or UNKNOWN
    tags[RUN_ID_TAG] = run_id
    kfp_run = os.environ.get(lineage.KFP_RUN_ID_ENV)
    if kfp_run:  # a pipeline task, which KFP may retry after it registered: no second version
        tags[lineage.KFP_RUN_TAG] = kfp_run
        earlier = registered_in_run(mc, name, run_id, kfp_run)
        if earlier is not None:
            log.info("run %s is registered as %s version %s in KFP run %s already: reusing it", run_id, name,
                     earlier.version, kfp_run)
            return earlier
    try:
        mv = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as exc:
        raise RegistryError(f"registering {model_uri} as {name!r} failed: {exc.message}") from exc
    log.info("registered %s as %s version %s", model_uri, name, mv.version)
    return mv


def registered_in_run(mc: MlflowClient, name: str, run_id: str, kfp_run: str) -> ModelVersion | None:
    """The version of `name` that KFP run `kfp_run` registered for training run `run_id`, if any."""
    found = [mv for mv in mc.search_model_versions(f"name='{name}' and run_id='{run_id}'")
             if mv.tags.get(lineage.KFP_RUN_TAG) == kfp_run]
    return min(found, key=lambda mv: int(mv.version)) if found else None


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
