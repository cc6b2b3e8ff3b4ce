"""MLflow Model Registry: register a trained run's model, gate it, promote it with an alias.

Why it is built this way:
- Aliases (`staging`, `production`), never the deprecated stages. A version's evaluation metrics,
  data version and git commit are version tags (`metric.<key>`, `data_version`, `git_commit`), so
  the gate compares what the registry itself says, not a file that may have moved on.
- Champion/challenger: a candidate takes the alias only if its primary metric is strictly greater
  than the current holder's on the same data version (a tie is not a win); with no holder it is
  promoted; `force` overrides with a recorded reason.
- Every promotion writes a history record (who, when, why, the previous holder, both metric values)
  as a version tag `promotion.<seq>` holding JSON; `seq` is a per-model sequence number, so
  `history()` reads the promotions back in the order they happened.
- MLflow has no transactions, and two promotions may race (two pipeline runs finishing together).
  The gate's read-decide-write therefore runs under a lock: a registered model named
  `<name>.promotion-lock` whose creation is atomic in the tracking store (a unique name), deleted
  when done. The second promoter waits, then compares against the first one's result, so the alias
  ends on one of the two and the history chain (each record's `previous` is the record before it)
  says so. A lock left by a killed process expires after `LOCK_LEASE_S`. After moving the alias the
  holder is read back, which catches anyone moving it without the lock (e.g. by hand in the UI).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from tasn.errors import ServiceError, TASNError

log = logging.getLogger(__name__)

METRIC_TAG = "metric."
DATA_VERSION_TAG = "data_version"
GIT_COMMIT_TAG = "git_commit"
RUN_ID_TAG = "run_id"
PROMOTION_TAG = "promotion."
SEQ_TAG = "promotion_seq"  # registered-model tag: the last sequence number handed out
LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_S = 600.0
PRODUCTION = "production"
UNKNOWN = "unknown"


class RegistryError(TASNError):
    """A registry request names something that is not there or not allowed (version, alias, tag)."""


@dataclass
class Decision:
    """The gate's verdict for one candidate; what registration.json and --decision-file hold."""

    name: str
    version: str
    alias: str
    decision: str  # promote | refuse | unchanged
    reason: str
    primary_metric: str
    candidate: float | None
    incumbent: float | None
    incumbent_version: str | None
    data_version: str
    forced: bool = False
    dry_run: bool = False
    applied: bool = False  # the alias was actually moved
    seq: int | None = None

    @property
    def promote(self) -> bool:
        return self.decision == "promote"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "promote": self.promote}


def client(tracking_uri: str | None = None):
    """An MlflowClient on `tracking_uri` (else MLflow's current one) for tracking and registry."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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


def _error_code(exc: Exception) -> str:
    return getattr(exc, "error_code", "") or ""


def metric_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Finite numbers of a flat metrics dict as `metric.<key>` tags (repr: exact round trip)."""
    tags = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            tags[METRIC_TAG + key] = repr(float(value))
    return tags


def register(
    run_id: str,
    model_uri: str,
    metrics: dict[str, Any],
    name: str,
    *,
    data_version_tag: str = "data.version",
    git_commit_tags: tuple[str, ...] = ("git.commit", "mlflow.source.git.commit"),
):
    """Register `model_uri` (logged by run `run_id`) as a new version of `name`, tagged with the
    metrics, the data version (the run's tag `data_version_tag`, set by `tasn train`) and the git
    commit (the run's `git.commit` tag, else MLflow's source tag, else this checkout's HEAD). Returns the ModelVersion.
    Uses MLflow's current tracking/registry URI (`tasn.tracking.setup` sets it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasn import tracking

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
    tags[GIT_COMMIT_TAG] = commit or tracking.git_commit() or UNKNOWN
    tags[RUN_ID_TAG] = run_id
    try:
        mv = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as exc:
        raise RegistryError(f"registering {model_uri} as {name!r} failed: {exc.message}") from exc
    log.info("registered %s as %s version %s", model_uri, name, mv.version)
    return mv


def get_version(mc, name: str, version: str | int):
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} version {version} not found: {exc.message}") from exc


def alias_holder(mc, name: str, alias: str):
    """The ModelVersion holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_metric(mv, metric: str) -> float:
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
        raise RegistryError(f"model {mv.name!r} version {mv.version}: tag {METRIC_TAG}{metric}={raw!r} is not a number") from exc


@contextlib.contextmanager
def promotion_lock(mc, name: str, timeout: float = 120.0, lease: float = LOCK_LEASE_S) -> Iterator[str]:
    """Hold `<name>.promotion-lock` (an atomically created registered model) for the duration.

    Waits up to `timeout` seconds for another holder; a lock whose lease has run out (its process
    died) is removed and taken over.
    """
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while True:
        tags = {"owner": actor(), "token": token, "since": utc_now(), "expires": repr(time.time() + lease)}
        try:
            mc.create_registered_model(lock, tags=tags, description=f"promotion lock of {name}; delete only if its owner died")
            break
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise ServiceError(f"cannot take the promotion lock {lock!r}: {exc.message}") from exc
        held = _lock_tags(mc, lock)
        if held is None:
            continue  # released between our two calls
        if float(held.get("expires", "0")) < time.time():
            log.warning("promotion lock %s of %s expired; taking it over", lock, held.get("owner"))
            _release(mc, lock, held.get("token"))
            continue
        if time.monotonic() > deadline:
            raise ServiceError(
                f"model {name!r} is being promoted by {held.get('owner')} (lock {lock!r} held since "
                f"{held.get('since')}); try again later, or delete that registered model if its owner died"
            )
        time.sleep(0.1 + random.random() * 0.2)
    try:
        yield lock
    finally:
        _release(mc, lock, token)


def _lock_tags(mc, lock: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(mc.get_registered_model(lock).tags)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _release(mc, lock: str, token: str | None) -> None:
    """Delete the lock if it is still the one with `token` (not one a successor took)."""
    from mlflow.exceptions import MlflowException

    held = _lock_tags(mc, lock)
    if held is None or held.get("token") != token:
        return
    with contextlib.suppress(MlflowException):
        mc.delete_registered_model(lock)


def _next_seq(mc, name: str) -> int:
    seq = int(mc.get_registered_model(name).tags.get(SEQ_TAG, "0")) + 1
    mc.set_registered_model_tag(name, SEQ_TAG, str(seq))
    return seq


def _move_alias(mc, decision: Decision, run_id: str | None) -> None:
    """Set the alias, record the promotion on the version, and check the alias stayed put.
    Call under the promotion lock."""
    seq = _next_seq(mc, decision.name)
    mc.set_registered_model_alias(decision.name, decision.alias, decision.version)
    record = {
        "seq": seq,
        "alias": decision.alias,
        "version": decision.version,
        "previous": decision.incumbent_version,
        "who": actor(),
        "when": utc_now(),
        "why": decision.reason,
        "forced": decision.forced,
        "primary_metric": decision.primary_metric,
        "candidate": decision.candidate,
        "incumbent": decision.incumbent,
        "data_version": decision.data_version,
        "run_id": run_id,
    }
    mc.set_model_version_tag(decision.name, decision.version, f"{PROMOTION_TAG}{seq:06d}", json.dumps(record, sort_keys=True))
    holder = alias_holder(mc, decision.name, decision.alias)
    if holder is None or str(holder.version) != decision.version:
        raise ServiceError(
            f"alias {decision.alias!r} of {decision.name!r} was moved to "
            f"{holder.version if holder else 'nothing'} while version {decision.version} was being "
            "promoted: someone changes it without `tasn promote`; check `tasn registry history`"
        )
    decision.applied, decision.seq = True, seq


def gate(
    name: str,
    version: str | int,
    *,
    alias: str = "staging",
    primary_metric: str = "master_aux_top1",
    force: bool = False,
    reason: str | None = None,
    dry_run: bool = False,
    mlflow_client=None,
) -> Decision:
    """The champion/challenger gate for `alias`; moves the alias unless refused or `dry_run`."""
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs --reason TEXT: a forced promotion records why")
    mc = mlflow_client or client()
    mv = get_version(mc, name, version)
    version = str(mv.version)
    data_version = mv.tags.get(DATA_VERSION_TAG, UNKNOWN)
    candidate = version_metric(mv, primary_metric) if not force else _maybe_metric(mv, primary_metric)
    lock = promotion_lock(mc, name) if not dry_run else contextlib.nullcontext()
    with lock:
        holder = alias_holder(mc, name, alias)
        d = Decision(
            name=name, version=version, alias=alias, decision="refuse", reason="",
            primary_metric=primary_metric, candidate=candidate, incumbent=None,
            incumbent_version=str(holder.version) if holder else None, data_version=data_version,
            forced=force, dry_run=dry_run,
        )
        if holder is not None:
            d.incumbent = _maybe_metric(holder, primary_metric)
        if holder is not None and str(holder.version) == version:
            d.decision, d.reason = "unchanged", f"version {version} already holds {alias!r}"
        elif force:
            d.decision, d.reason = "promote", f"forced: {reason.strip()}"
        elif holder is None:
            d.decision = "promote"
            d.reason = f"no version holds {alias!r}: first promotion ({primary_metric} {candidate:.6g})"
        else:
            _judge(d, holder)
        if d.promote and not dry_run:
            _move_alias(mc, d, mv.run_id)
    log.info("gate %s v%s -> %s: %s (%s)", name, version, alias, d.decision, d.reason)
    return d


def _maybe_metric(mv, metric: str) -> float | None:
    try:
        return version_metric(mv, metric)
    except RegistryError:
        return None


def _judge(d: Decision, holder) -> None:
    """Fill decision/reason for a candidate against a current holder (not forced)."""
    held_data = holder.tags.get(DATA_VERSION_TAG, UNKNOWN)
    numbers = f"candidate v{d.version} {d.primary_metric}={d.candidate:.6g}"
    if d.incumbent is not None:
        numbers += f", {d.alias} v{holder.version} {d.primary_metric}={d.incumbent:.6g}"
    if held_data != d.data_version:
        d.reason = (
            f"not comparable: candidate v{d.version} was evaluated on data version {d.data_version}, "
            f"{d.alias} v{holder.version} on {held_data} ({numbers}); promote with --force --reason"
        )
    elif d.incumbent is None:
        d.reason = f"{d.alias} v{holder.version} has no {d.primary_metric} tag to compare with ({numbers}); promote with --force --reason"
    elif d.candidate > d.incumbent:
        d.decision, d.reason = "promote", f"better: {numbers} on data version {d.data_version}"
    else:
        word = "tie (not a win)" if d.candidate == d.incumbent else "worse"
        d.reason = f"{word}: {numbers} on data version {d.data_version}"


def to_production(
    name: str,
    version: str | int | None = None,
    *,
    source_alias: str = "staging",
    reason: str | None = None,
    dry_run: bool = False,
    mlflow_client=None,
) -> Decision:
    """Give `production` to the version holding `source_alias` (which `version`, if given, must be).

    The source alias stays where it is: the staging champion remains the bar the next candidate
    must beat.
    """
    mc = mlflow_client or client()
    lock = promotion_lock(mc, name) if not dry_run else contextlib.nullcontext()
    with lock:
        staged = alias_holder(mc, name, source_alias)
        if staged is None:
            raise RegistryError(f"no version of {name!r} holds {source_alias!r}: promote one to {source_alias} first")
        if version is not None and str(version) != str(staged.version):
            raise RegistryError(
                f"version {version} of {name!r} does not hold {source_alias!r} (version {staged.version} does): "
                f"only the {source_alias} version moves to {PRODUCTION}"
            )
        current = alias_holder(mc, name, PRODUCTION)
        d = Decision(
            name=name, version=str(staged.version), alias=PRODUCTION, decision="promote",
            reason=reason.strip() if reason and reason.strip() else f"version {staged.version} moved on from {source_alias}",
            primary_metric="", candidate=None, incumbent=None,
            incumbent_version=str(current.version) if current else None,
            data_version=staged.tags.get(DATA_VERSION_TAG, UNKNOWN), dry_run=dry_run,
        )
        if current is not None and str(current.version) == d.version:
            d.decision, d.reason = "unchanged", f"version {d.version} already holds {PRODUCTION!r}"
        elif not dry_run:
            _move_alias(mc, d, staged.run_id)
    return d


def history(name: str, *, mlflow_client=None) -> dict[str, Any]:
    """All promotions of `name` in order, and who holds each alias now.

    Returns {"name", "promotions": [record, ...] (by seq), "aliases": {alias: version},
    "consistent": bool, "problems": [text]}: consistent means, per alias, each record's `previous`
    is the version of the record before it and the last record's version holds the alias now.
    """
    from mlflow.exceptions import MlflowException

    mc = mlflow_client or client()
    try:
        model = mc.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} not found on {mc.tracking_uri}: {exc.message}") from exc
    escaped = name.replace("'", "\\'")
    records = []
    for mv in mc.search_model_versions(f"name='{escaped}'"):
        for key, value in mv.tags.items():
            if key.startswith(PROMOTION_TAG):
                records.append(json.loads(value))
    records.sort(key=lambda r: r["seq"])
    aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
    problems = []
    last: dict[str, str | None] = {}
    for rec in records:
        alias = rec["alias"]
        if alias in last and rec.get("previous") != last[alias]:
            problems.append(f"#{rec['seq']}: {alias} v{rec['version']} says previous {rec.get('previous')}, history says {last[alias]}")
        last[alias] = rec["version"]
    for alias, version in aliases.items():
        if last.get(alias) != version:
            problems.append(f"{alias} is held by v{version} but the last recorded promotion is {last.get(alias)}")
    return {"name": name, "promotions": records, "aliases": aliases, "consistent": not problems, "problems": problems}
