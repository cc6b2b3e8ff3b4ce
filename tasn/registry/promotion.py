"""Moving an alias: the staging gate (champion/challenger under the lock) and production.

Aliases (`staging`, `production`), never the deprecated stages. Every promotion writes a history
record (who, when, why, the previous holder, both metric values) as a version tag
`promotion.<seq>` holding JSON; `seq` is a per-model sequence number handed out under the lock, so
`tasn.registry.history` reads the promotions back in the order they happened. The record is
written before the alias moves, and every promotion first withdraws the record of one that was
killed between the two (`tasn.registry.history.mend`), so the history never stays inconsistent
past the next run. After moving the alias the holder is read back, which catches anyone moving it
without the lock (e.g. by hand).
The descriptions follow: the promoted version gets a line saying how it was promoted, the previous
holder one saying the alias moved on, and the registered model's says who holds what now.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from tasn.errors import RegistryError, ServiceError
from tasn.registry import describe
from tasn.registry.gate import Outcome, judge, require_reason
from tasn.registry.history import mend
from tasn.registry.lock import Lease, promotion_lock
from tasn.registry.tags import DATA_VERSION_TAG, PRODUCTION, PROMOTION_TAG, SEQ_TAG, UNKNOWN
from tasn.registry.versions import (
    actor,
    add_description_line,
    alias_holder,
    client,
    get_version,
    refresh_model_description,
    standing,
    utc_now,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """The verdict for one candidate and what came of it; what registration.json and
    `tasn promote --decision-file` hold."""

    name: str
    version: str
    alias: str
    decision: Outcome
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


def gate(
    name: str,
    version: str | int,
    *,
    alias: str = "staging",
    primary_metric: str = "master_aux_top1",
    force: bool = False,
    reason: str | None = None,
    dry_run: bool = False,
    mlflow_client: MlflowClient | None = None,
) -> Decision:
    """The champion/challenger gate for `alias` (`tasn.registry.gate.judge`); moves the alias
    unless refused or `dry_run`."""
    forced = require_reason(force, reason)
    mc = mlflow_client or client()
    mv = get_version(mc, name, version)
    candidate = standing(mv, primary_metric, required=not force)
    with promotion_lock(mc, name) if not dry_run else contextlib.nullcontext() as lease:
        if lease is not None:
            mend(mc, name, lease.model)
        holder = alias_holder(mc, name, alias)
        incumbent = standing(holder, primary_metric) if holder is not None else None
        verdict = judge(candidate, incumbent, alias=alias, primary_metric=primary_metric, forced=forced)
        decision = Decision(
            name=name, version=candidate.version, alias=alias, decision=verdict.decision, reason=verdict.reason,
            primary_metric=primary_metric, candidate=candidate.metric,
            incumbent=incumbent.metric if incumbent else None,
            incumbent_version=incumbent.version if incumbent else None,
            data_version=candidate.data_version, forced=force, dry_run=dry_run,
        )
        if decision.promote and not dry_run:
            decision = _move_alias(mc, decision, mv.run_id, lease)
    log.info("gate %s v%s -> %s: %s (%s)", name, decision.version, alias, decision.decision, decision.reason)
    return decision


def to_production(
    name: str,
    version: str | int | None = None,
    *,
    source_alias: str = "staging",
    reason: str | None = None,
    dry_run: bool = False,
    mlflow_client: MlflowClient | None = None,
) -> Decision:
    """Give `production` to the version holding `source_alias` (which `version`, if given, must be).

    The source alias stays where it is: the staging champion remains the bar the next candidate
    must beat.
    """
    mc = mlflow_client or client()
    with promotion_lock(mc, name) if not dry_run else contextlib.nullcontext() as lease:
        if lease is not None:
            mend(mc, name, lease.model)
        staged = alias_holder(mc, name, source_alias)
        if staged is None:
            raise RegistryError(f"no version of {name!r} holds {source_alias!r}: promote one to {source_alias} first")
        if version is not None and str(version) != str(staged.version):
            raise RegistryError(
                f"version {version} of {name!r} does not hold {source_alias!r} (version {staged.version} does): "
                f"only the {source_alias} version moves to {PRODUCTION}"
            )
        current = alias_holder(mc, name, PRODUCTION)
        staged_version = str(staged.version)
        unchanged = current is not None and str(current.version) == staged_version
        why = reason.strip() if reason and reason.strip() else f"version {staged_version} moved on from {source_alias}"
        decision = Decision(
            name=name, version=staged_version, alias=PRODUCTION, decision="unchanged" if unchanged else "promote",
            reason=f"version {staged_version} already holds {PRODUCTION!r}" if unchanged else why,
            primary_metric="", candidate=None, incumbent=None,
            incumbent_version=str(current.version) if current else None,
            data_version=staged.tags.get(DATA_VERSION_TAG, UNKNOWN), dry_run=dry_run,
        )
        if decision.promote and not dry_run:
            decision = _move_alias(mc, decision, staged.run_id, lease)
    return decision


def _next_seq(mc: MlflowClient, name: str, model: RegisteredModel | None = None) -> int:
    seq = int((model or mc.get_registered_model(name)).tags.get(SEQ_TAG, "0")) + 1
    mc.set_registered_model_tag(name, SEQ_TAG, str(seq))
    return seq


def _move_alias(mc: MlflowClient, decision: Decision, run_id: str | None, lease: Lease | None) -> Decision:
    """Record the promotion on the version, then set the alias, and check the alias stayed put.
    Call under the promotion lock (`lease`, checked still ours first). The record goes first so that
    a kill between the two leaves a record of a move that did not happen, which the next promotion
    withdraws (`tasn.registry.history.mend`), never an alias moved with no record of why. Returns
    the decision, applied."""
    seq = _next_seq(mc, decision.name, lease.verify() if lease is not None else None)
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
    try:
        mc.set_model_version_tag(decision.name, decision.version, f"{PROMOTION_TAG}{seq:06d}",
                                 json.dumps(record, sort_keys=True))
        mc.set_registered_model_alias(decision.name, decision.alias, decision.version)
    except MlflowException as exc:
        raise ServiceError(f"MLflow refused to move {decision.alias!r} of {decision.name!r} to version "
                           f"{decision.version}: {exc.message}") from exc
    holder = alias_holder(mc, decision.name, decision.alias)
    if holder is None or str(holder.version) != decision.version:
        raise ServiceError(
            f"alias {decision.alias!r} of {decision.name!r} was moved to "
            f"{holder.version if holder else 'nothing'} while version {decision.version} was being "
            "promoted: someone changes it without `tasn promote`; check `tasn registry history`"
        )
    add_description_line(mc, decision.name, decision.version, describe.promotion_line(record))
    if decision.incumbent_version and decision.incumbent_version != decision.version:
        add_description_line(mc, decision.name, decision.incumbent_version, describe.displaced_line(record))
    refresh_model_description(mc, decision.name)
    return dataclasses.replace(decision, applied=True, seq=seq)
