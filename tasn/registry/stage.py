"""The registry stages, each from a config: `register` (a trained run's model becomes a new
version, optionally gated), `promote` (the staging gate, or the move to production) and
`promotion_history`. Each points MLflow at the configured store first.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasn import tracking
from tasn.config import Config
from tasn.errors import TASNError
from tasn.io import (
    EVALUATED,
    MODEL_SHA256,
    atomic_write_json,
    check_same_model,
    file_sha256,
    output_lock,
    read_json,
)
from tasn.registry.gate import require_reason
from tasn.registry.history import history
from tasn.registry.promotion import Decision, gate, to_production
from tasn.registry.tags import PRODUCTION
from tasn.registry.versions import register_version

REGISTRATION = "registration.json"  # the new version, and the gate's decision when asked to promote
PENDING = ".registration.pending"  # in --out while an attempt is unfinished: its token and inputs (`_attempt`)
REFUSED_EXIT = 3  # `tasn promote`'s exit status when the gate refuses: an outcome, told apart from a failure (1)


@dataclass(frozen=True)
class RegisterResult:
    out_dir: Path
    registration: dict[str, Any]  # what registration.json holds
    decision: Decision | None  # the staging gate's, when asked to promote


def register(cfg: Config, run_json: str | os.PathLike[str], metrics_json: str | os.PathLike[str],
             out_dir: str | os.PathLike[str], *, name: str | None = None, promote: bool = False) -> RegisterResult:
    """Register the model of the run in `run_json` (train's run.json) with the metrics of
    `metrics_json` (evaluate's metrics.json, which must be of the same model: the `evaluated.json`
    beside it and run.json record its sha256, `tasn.io.check_same_model`) as a new version of
    `name` (default `register.model_name`), in the MLflow store the run lives in unless
    `tracking.uri` says otherwise, when `registers` says so; with `promote`, run the staging gate,
    unless `register.promote` is false or this is a DVC experiment (`dvc exp run` sets
    DVC_EXP_NAME): a person promotes the version they pick, so no experiment moves the alias.
    Writes registration.json to `out_dir`, which is held against a second run meanwhile and
    checked writable before the registry is touched; a rerun after a failed attempt reuses the
    version that attempt made (`_attempt`). A refusal, or a run left unregistered, is a recorded
    decision, not a failure."""
    run = tracking.RunInfo.read(run_json, "--run-json")
    metrics = read_json(metrics_json, "--metrics")
    out = Path(out_dir)
    model_name = name or cfg.register.model_name
    skipped = not_registered_reason(cfg)
    if skipped:
        with output_lock(out):
            return _record(out, {
                "name": model_name, "version": None, "run_id": run.run_id, "model_uri": run.model_uri,
                "primary_metric": cfg.register.primary_metric, "decision": "not registered", "reason": skipped,
                "candidate": metrics.get(cfg.register.primary_metric), "incumbent": None}, None)
    if not (run.run_id and run.model_uri):
        missing = [k for k in ("run_id", "model_uri") if not getattr(run, k)]
        raise TASNError(f"--run-json {run_json}: no {' or '.join(missing)} (was the training run tracked in MLflow?)")
    evaluated = Path(metrics_json).with_name(EVALUATED)  # evaluate's record of the model it measured
    check_same_model((read_json(run_json, "--run-json").get(MODEL_SHA256), f"--run-json {run_json}"),
                     (read_json(evaluated, "the record beside --metrics").get(MODEL_SHA256) if evaluated.is_file()
                      else None, f"--metrics {metrics_json} (by {evaluated.name})"))
    with output_lock(out):
        attempt = _attempt(out, {"run_id": run.run_id, "model_uri": run.model_uri, "name": model_name,
                                 "metrics": file_sha256(metrics_json)})
        tracking.setup(cfg.tracking, run.tracking_uri)
        mv = register_version(run.run_id, run.model_uri, metrics, model_name,
                              primary_metric=cfg.register.primary_metric, attempt=attempt)
        registration: dict[str, Any] = {
            "name": model_name, "version": str(mv.version), "run_id": run.run_id, "model_uri": run.model_uri,
            "primary_metric": cfg.register.primary_metric, "decision": "not gated",
            "reason": not_gated_reason(cfg, promote, str(mv.version)), "candidate": None, "incumbent": None,
        }
        decision = None
        if promote and cfg.register.promote and not os.environ.get(tracking.DVC_EXP_ENV):
            decision = gate(model_name, mv.version, alias=cfg.register.alias,
                            primary_metric=cfg.register.primary_metric)
            registration.update({k: v for k, v in decision.to_dict().items() if k != "name"})
        result = _record(out, registration, decision)
        (out / PENDING).unlink(missing_ok=True)
    return result


def _record(out: Path, registration: dict[str, Any], decision: Decision | None) -> RegisterResult:
    atomic_write_json(out / REGISTRATION, registration)
    return RegisterResult(out, registration, decision)


def _attempt(out: Path, inputs: dict[str, str]) -> str:
    """The token of this registration attempt, tagged on the version it makes: the unfinished
    attempt's (`PENDING` in `out`, for the same inputs) when there is one, so that its version is
    reused; else a new one, recorded there before anything is registered, which also proves `out`
    writable while nothing has been registered yet."""
    marker = out / PENDING
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            earlier = json.loads(marker.read_text())
        except (OSError, ValueError):
            earlier = {}
        if isinstance(earlier, dict) and earlier.get("inputs") == inputs and isinstance(earlier.get("token"), str):
            return earlier["token"]
        token = uuid.uuid4().hex
        atomic_write_json(marker, {"token": token, "inputs": inputs})
    except OSError as exc:
        raise TASNError(f"--out {out}: cannot write there ({exc.strerror}); nothing was registered") from None
    return token


def registers(cfg: Config) -> bool:
    """The rule for what becomes a registered version: `register.enabled` true or false says so;
    `auto` (the default) registers every run except a DVC experiment's (`dvc exp run`): a sweep
    logs all its runs to MLflow, where they are compared, and registers only when asked
    (`dvc exp run -S register.enabled=true`), so the registry holds candidates, not noise. `dvc
    repro` (`make run`), `tasn register` and the Kubeflow pipeline register as before."""
    if cfg.register.enabled == "auto":
        return not os.environ.get(tracking.DVC_EXP_ENV)
    return bool(cfg.register.enabled)


def not_registered_reason(cfg: Config) -> str | None:
    """Why `register` leaves the run unregistered (what registration.json says), or None."""
    if registers(cfg):
        return None
    if cfg.register.enabled is False:
        return "register.enabled is false: the run is in MLflow, no version was registered"
    return (f"DVC experiment {os.environ.get(tracking.DVC_EXP_ENV)}: experiments register only when asked "
            "(-S register.enabled=true); its run is in MLflow, compare it there or with `dvc exp show`")


def not_gated_reason(cfg: Config, promote: bool, version: str) -> str:
    """Why `register` leaves the alias alone (what registration.json says when it does)."""
    if not promote:
        return "registered without --promote"
    how = f"`tasn promote --version {version}` promotes it through the gate"
    if not cfg.register.promote:
        return f"register.promote is false: {how}"
    return f"DVC experiment {os.environ.get(tracking.DVC_EXP_ENV)}: experiments never move {cfg.register.alias}; {how}"


def promote(cfg: Config, version: str | None, *, name: str | None = None,
            to: Literal["staging", "production"] = "staging", force: bool = False, reason: str | None = None,
            dry_run: bool = False, decision_file: str | os.PathLike[str] | None = None) -> Decision:
    """Staging: the champion/challenger gate for `version` (alias `register.alias`). Production:
    move the version holding `register.alias` on (`version`, if given, must be that one). With
    `decision_file` the decision is also written there as JSON (what a pipeline's gate reads)."""
    require_reason(force, reason)
    if to != PRODUCTION and version is None:
        raise TASNError("--version is required to promote to staging")
    tracking.setup(cfg.tracking)
    model_name = name or cfg.register.model_name
    if to == PRODUCTION:
        decision = to_production(model_name, version, source_alias=cfg.register.alias, reason=reason, dry_run=dry_run)
    else:
        assert version is not None
        decision = gate(model_name, version, alias=cfg.register.alias, primary_metric=cfg.register.primary_metric,
                        force=force, reason=reason, dry_run=dry_run)
    if decision_file:
        atomic_write_json(decision_file, decision.to_dict())
    return decision


def promotion_history(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """`tasn.registry.history.history` of `name` (default `register.model_name`)."""
    tracking.setup(cfg.tracking)
    return history(name or cfg.register.model_name)
