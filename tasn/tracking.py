"""MLflow for a training run: where it goes, a fail-fast connection check, and logging that a
flaky server cannot kill.

Where: `tracking.uri`, else `MLFLOW_TRACKING_URI`, else a local sqlite store `mlflow.db` with
artifacts under `mlruns/` at the project root: `$DVC_ROOT` when DVC runs the stage (DVC points it at
the workspace even for `dvc exp run --temp` / `--queue`, which run in a throwaway copy), else the
checkout holding the working directory. So `mlflow ui` in the project shows every run and every
experiment, wherever DVC ran it. A remote server is checked before training starts, so a wrong URI
costs seconds, not an epoch.

What a run says about itself: a name that tells it apart in the runs table (`run_name`: the DVC
experiment's name, else kind-backbone-out size-suffix), the context it ran in as tags
(`context_tags`: the Kubeflow run id, the DVC experiment), its code as MLflow's own
`mlflow.source.git.commit`, and its data as an MLflow dataset input (`Run.log_dataset`) whose digest
is the data version, so the UI shows which data each run used. Its experiment is marked as one of
model training (`mark_training_experiment`), and `runs_page` is the UI address that opens on its
runs table.

During the run every MLflow call goes through `Run` (`Outage`): MLflow's own client retries what a
retry can mend, within bounds the config sets (`http_settings`: `tracking.request_timeout`,
`tracking.request_retries`); a refusal is not retried, and a server that stays away is logged once
and left alone for a while: losing metric points is better than losing a week of GPU time.

Credentials: the MLflow client reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (basic
auth, as the cluster's server wants) or MLFLOW_TRACKING_TOKEN; the connection check sends the same.
A tracking URI with userinfo (`https://user:pw@host`) is split into those variables, so MLflow,
run.json and every message see only `https://host`. Params and tags go through `tasn.redact`.

mlflow itself is imported on first use (`_mlflow()`), so the training stage, and the benchmarks
built on it, run with tracking off on a machine without the MLOps stack.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tasn.config import TrackingConfig
from tasn.errors import ServiceError
from tasn.io import read_json
from tasn.lineage import KFP_RUN_ID_ENV, KFP_RUN_TAG
from tasn.redact import REDACTED as REDACTED  # the marker scrubbed values carry
from tasn.redact import redact_mapping, redact_text, redact_uri, split_userinfo

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"  # MLflow reads both
# What the connection check asks for: any authenticated user may list experiments (the basic-auth
# app filters the answer by permission), and a server without authentication answers it too.
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
PROBE_READ_TIMEOUT_S = 60.0  # a loaded server may take seconds (basic auth hashes the password); no answer is fast
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")

DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for every stage command: the workspace, also for temp/queued experiments
DVC_EXP_ENV = "DVC_EXP_NAME"  # set by DVC for `dvc exp run` (not for `dvc repro`)
DVC_EXP_TAG = "dvc.exp_name"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the UI links it; set explicitly (see Run)
DATA_VERSION_TAG = "data.version"
DIGEST_LEN = 36  # MLflow's dataset digest column holds 36 characters: an md5 + ".dir" fits exactly
UNVERSIONED = (None, "", "untracked", "unknown")
# MLflow 3's experiment kind: training runs of a model, not a GenAI app's traces. MLflow 3.17's UI
# chooses an experiment's pages by its own "GenAI | Model training" switch instead (the URL's
# `workflowType`, else the browser's last choice, else GenAI): `runs_page` is the address that opens
# on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW = "machine_learning"  # the switch's "Model training" (mlflow/server/js: workflowType)


def _mlflow() -> ModuleType:
    """mlflow, imported on first use (see the module docstring)."""
    import mlflow

    return mlflow


def is_mlflow_uri(uri: str) -> bool:
    """A model or artifact URI that MLflow resolves (models:/NAME@ALIAS, runs:/ID/model, ...),
    as opposed to a local path or s3:// URI of a model file."""
    return uri.startswith(MLFLOW_SCHEMES)


@dataclass(frozen=True)
class RunInfo:
    """Where a training run lives in MLflow: what its run.json holds (all None when untracked)."""

    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    model_uri: str | None = None  # the logged model, e.g. models:/m-... or runs:/ID/model

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def read(cls, path: str | os.PathLike[str], what: str = "the run file") -> RunInfo:
        data = read_json(path, what)
        return cls(**{k: data.get(k) for k in ("run_id", "experiment_id", "tracking_uri", "model_uri")})


# -- where ----------------------------------------------------------------------------------

def project_root() -> Path:
    """Where the local store lives: `$DVC_ROOT` (DVC's workspace, also when the stage runs in a
    temporary copy for `dvc exp run --temp/--queue`), else the nearest folder above the working
    directory holding `.dvc` or `.git`, else the working directory."""
    if os.environ.get(DVC_ROOT_ENV):
        return Path(os.environ[DVC_ROOT_ENV]).resolve()
    cwd = Path.cwd().resolve()
    return next((p for p in (cwd, *cwd.parents) if (p / ".dvc").is_dir() or (p / ".git").exists()), cwd)


def resolve_uri(cfg: TrackingConfig, run_uri: str | None = None) -> str:
    """config `tracking.uri` > `run_uri` (the store a run already lives in: register and evaluate
    go where train went) > MLFLOW_TRACKING_URI > sqlite:///<project root>/mlflow.db. run.json records
    a URI without credentials; MLFLOW_TRACKING_URI naming the same server with them stands in for it."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if run_uri and env_uri and split_userinfo(env_uri)[0] == run_uri:
        run_uri = env_uri  # the same server: the environment's URI may carry its credentials
    return cfg.uri or run_uri or env_uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def local_artifact_root() -> str:
    return (project_root() / "mlruns").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, with the server named, when an http(s) tracking server does not take a
    connection within `timeout` seconds or does not answer, or refuses the credentials MLflow will
    send (the same request MLflow's client makes), or a sqlite store's folder cannot be written."""
    if uri.startswith(("http://", "https://")):
        from mlflow.exceptions import MlflowException
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        shown = redact_uri(uri)
        try:
            resp = http_request(get_default_host_creds(uri), PROBE_ENDPOINT, "GET", max_retries=0,
                                timeout=(timeout, PROBE_READ_TIMEOUT_S),
                                raise_on_status=False, params={"max_results": 1})
        except MlflowException as exc:
            raise ServiceError(
                f"MLflow tracking server {shown} is not reachable ({redact_text(exc.message)}); start it, or set "
                "tracking.uri / MLFLOW_TRACKING_URI to a running server (unset both for a local "
                "sqlite store), or -S tracking.enabled=false to train without tracking"
            ) from None
        if resp.status_code in (401, 403):
            raise ServiceError(access_refused(shown, resp.status_code))
        if resp.status_code >= 500:
            raise ServiceError(f"MLflow tracking server {shown} answered {resp.status_code} at {PROBE_ENDPOINT}")
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise ServiceError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")


def access_refused(server: str, status: int, what: str = "") -> str:
    """The message for a 401 (who are you?) or 403 (not allowed) from an MLflow server."""
    user = os.environ.get(USER_ENV)
    if status == 401:
        who = f"did not accept user {user!r}" if user else "needs a user, and none was given"
        return (f"MLflow tracking server {server} {who} (401 Unauthorized): set {USER_ENV} and {PASSWORD_ENV} "
                "to an account of that server (in the cluster: the Secret tasn-mlflow-credentials)")
    return (f"MLflow tracking server {server} refused {what or 'the request'} to user {user or '(none)'!r} "
            f"(403 Permission denied): ask its admin for the permission (moving an alias or registering a "
            f"version needs EDIT on the registered model), or set {USER_ENV} / {PASSWORD_ENV} to a user who has it")


def refusal(exc: BaseException) -> str | None:
    """For an MLflow client error that is a 401/403 from the server (`exc` or one of its causes):
    what `access_refused` says, naming the current tracking server and the refused endpoint;
    else None."""
    cause: BaseException | None = exc
    while cause is not None:
        code = getattr(cause, "error_code", None)
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            endpoint = re.search(r"endpoint (\S+)", str(getattr(cause, "message", "")))
            server = redact_uri(_mlflow().get_tracking_uri())
            return access_refused(server, 401 if code == "UNAUTHENTICATED" else 403, endpoint[1] if endpoint else "")
        cause = cause.__cause__ or cause.__context__
    return None


def setup(cfg: TrackingConfig, run_uri: str | None = None) -> str:
    """Point MLflow at the store `resolve_uri` picks after checking it answers; return the URI.

    The userinfo of a server's URI moves to MLFLOW_TRACKING_USERNAME / _PASSWORD (what MLflow
    reads), and `cfg.uri` / MLFLOW_TRACKING_URI are rewritten without it: MLflow, the params,
    run.json, model.pt and checkpoints (which record the config) never see the credentials."""
    uri = resolve_uri(cfg, run_uri)
    if uri.startswith(("http://", "https://")):
        uri, user, password = split_userinfo(uri)
        for name, value in ((USER_ENV, user), (PASSWORD_ENV, password)):
            if value is not None:
                os.environ[name] = value
        cfg.uri = split_userinfo(cfg.uri)[0]
        if "MLFLOW_TRACKING_URI" in os.environ:
            os.environ["MLFLOW_TRACKING_URI"] = split_userinfo(os.environ["MLFLOW_TRACKING_URI"])[0]
    http_settings(cfg)
    check_reachable(uri)
    if cfg.s3_endpoint:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = cfg.s3_endpoint
    _mlflow().set_tracking_uri(uri)
    return uri


def experiment_id(name: str, uri: str) -> str:
    """The experiment's id, created if needed (a local sqlite store keeps artifacts in ./mlruns),
    and marked as one of training runs (`mark_training_experiment`)."""
    mlflow = _mlflow()
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = local_artifact_root() if uri.startswith("sqlite:") else None
        tags = {EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
        return str(mlflow.create_experiment(name, artifact_location=location, tags=tags))
    mark_training_experiment(exp)
    return str(exp.experiment_id)


def mark_training_experiment(exp: Any) -> None:
    """Tag an experiment made elsewhere (older tasn, `mlflow experiments create`) as one of model
    training runs, unless someone chose its kind already (MLflow's own record of what an
    experiment is; see UI_WORKFLOW for what its 3.17 UI reads)."""
    if EXPERIMENT_KIND_TAG in (exp.tags or {}):
        return
    try:
        _mlflow().MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
    except Exception as exc:  # an account that may log runs but not edit the experiment: a view, not a failure
        log.info("MLflow: experiment %s keeps no kind (%s); its UI opens on the GenAI overview", exp.name, exc)


def runs_page(experiment: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The address of an experiment's runs table in the MLflow UI at `ui` (what `mlflow ui`
    serves by default), in its "Model training" mode: a plain experiment address opens on the
    GenAI overview in MLflow 3.17, whatever the experiment's kind."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs?workflowType={UI_WORKFLOW}"


# -- what -----------------------------------------------------------------------------------

def scrub(mapping: dict[str, Any]) -> dict[str, Any]:
    """What may be sent as MLflow params or tags: `tasn.redact.redact_mapping` (credential-named
    keys' values and secrets inside values become `REDACTED`)."""
    return redact_mapping(mapping)


def context_tags() -> dict[str, str]:
    """The pipeline run this process belongs to, as tags: `kfp.run_id` (the Kubeflow run) and
    `dvc.exp_name` (the DVC experiment), each only when set."""
    found = {KFP_RUN_TAG: os.environ.get(KFP_RUN_ID_ENV), DVC_EXP_TAG: os.environ.get(DVC_EXP_ENV)}
    return {k: v for k, v in found.items() if v}


def run_name(kind: str, backbone: str, out_size: int) -> str:
    """The DVC experiment's name when DVC runs one (so the MLflow run and `dvc exp show` agree),
    else what the run trains plus a short random suffix, e.g. `tasn-resnet18-slim-out112-3f9a1c`."""
    return os.environ.get(DVC_EXP_ENV) or f"{kind}-{backbone}-out{out_size}-{uuid.uuid4().hex[:6]}"


def dataset_digest(version: str) -> str:
    """A data version as an MLflow dataset digest: itself when it fits the 36 characters MLflow
    stores (DVC's `<md5>.dir` does), else the start of its hash part."""
    return version if len(version) <= DIGEST_LEN else version.rsplit(":", 1)[-1][:DIGEST_LEN]


def dataset(source: str, version: str | None) -> Any:
    """An MLflow dataset for the data at `source` (path or URI), named after its folder, whose
    digest is the data version (MLflow's own digest of name and source when there is none)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    name = source.rstrip("/").rsplit("/", 1)[-1] or source
    digest = None if version in UNVERSIONED else dataset_digest(str(version))
    with warnings.catch_warnings():  # MLflow registers two equal sources for local paths and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        # MLflow marks Dataset.profile abstract but MetaDataset, its own metadata-only dataset, has none
        return MetaDataset(resolve_dataset_source(source), name=name, digest=digest)  # type: ignore[abstract]


def system_metrics_wanted(enabled: bool) -> bool:
    """MLflow's system metrics need psutil; an explicit MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false
    (as in the tests) wins over the config."""
    env = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower()
    return enabled and env not in ("false", "0") and importlib.util.find_spec("psutil") is not None


# -- a run that survives a flaky server ------------------------------------------------------

# MLflow's own HTTP retry settings (its client reads them on every request), given for this process
# by `http_settings` unless the environment sets them itself. With the defaults (timeout 20 s,
# 3 retries, backoff 1-2-4 s) a call to a server that is down costs at most ~90 s (one that refuses
# connections ~10 s), instead of MLflow's own ~4 min per attempt of tasn's, x4.
HTTP_ENV = {"timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT", "retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
            "backoff": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"}
HTTP_BACKOFF = 1  # MLflow's default is 2: waits of 2-4-8-... s
OUTAGE_PAUSE_S = 300.0  # after a remote server failed a call, the run's calls are skipped this long
_http_set_here: dict[str, str] = {}  # what http_settings put in os.environ (the rest is the user's)


def http_settings(cfg: TrackingConfig) -> dict[str, str]:
    """Point MLflow's HTTP client at `tracking.request_timeout` / `tracking.request_retries` (and
    HTTP_BACKOFF) for this process; a variable the environment set itself wins. Returns them."""
    wanted = {"timeout": str(cfg.request_timeout), "retries": str(cfg.request_retries), "backoff": str(HTTP_BACKOFF)}
    for key, name in HTTP_ENV.items():
        if name not in os.environ or os.environ[name] == _http_set_here.get(name):
            os.environ[name] = _http_set_here[name] = wanted[key]
    return {name: os.environ[name] for name in HTTP_ENV.values()}


def permanent(exc: BaseException) -> bool:
    """An MLflow answer that no retry changes: a 4xx other than 429 (bad request, not found, not
    allowed), as opposed to a server that is down, overloaded or unreachable."""
    status = exc.get_http_status_code() if hasattr(exc, "get_http_status_code") else None
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class Outage:
    """The calls a run makes to MLflow, so that a server that refuses a call or goes away never
    stops or stalls training: each call is made once (MLflow's client retries what a retry can
    mend, within `http_settings`); a refusal (`permanent`) is logged and the run goes on; a remote
    server that failed a call is left alone for OUTAGE_PAUSE_S, its calls skipped with one warning
    (their metrics are lost; the checkpoints and output files are not), then tried again."""

    def __init__(self, remote: bool):
        self.remote = remote
        self.until = 0.0  # monotonic time before which calls are skipped

    def call(self, fn: Callable[[], Any], what: str, always: bool = False) -> Any:
        """`fn()`, or None when it failed or the server is being left alone (unless `always`: the
        call that ends the run is made whatever, so the process never keeps a run open)."""
        if time.monotonic() < self.until and not always:
            return None
        try:
            return fn()
        except Exception as exc:  # the run goes on whatever MLflow says
            message = redact_text(str(getattr(exc, "message", exc)))[:500]
            if permanent(exc):
                log.warning("MLflow refused %s (%s); not retried, the run goes on", what, message)
            elif self.remote:
                self.until = time.monotonic() + OUTAGE_PAUSE_S
                log.warning("MLflow: %s failed (%s); the run goes on without MLflow for %.0f s (nothing is "
                            "logged to it meanwhile), then tries again", what, message, OUTAGE_PAUSE_S)
            else:
                log.warning("MLflow: %s failed (%s); the run goes on", what, message)
            return None


class Run:
    """The active MLflow run of a training process (rank 0 only), every call retried.

    A new run gets its tags when it starts: MLflow fills `mlflow.source.git.commit` from the
    script it runs (the venv's `tasn`, which may sit in another checkout or none), and tags given
    to start_run take precedence over MLflow's guesses.
    """

    def __init__(self, cfg: TrackingConfig, tags: dict[str, Any], run_id: str | None = None,
                 run_name: str | None = None):
        self.mlflow = _mlflow()
        self.uri = split_userinfo(setup(cfg))[0]  # what run.json records: a store's URI without credentials
        self.outage = Outage(remote=self.uri.startswith(("http://", "https://")))
        self.experiment_id = experiment_id(cfg.experiment, self.uri)
        system = system_metrics_wanted(cfg.system_metrics)
        active = None
        if run_id:
            try:
                active = self.mlflow.start_run(run_id=run_id, log_system_metrics=system)
                log.info("MLflow: continuing run %s", run_id)
            except Exception as exc:
                log.warning("MLflow: cannot continue run %s (%s); starting a new one", run_id, exc)
        if active is None:
            active = self.mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name,
                                           log_system_metrics=system, tags=self._clean(tags))
        else:
            self.set_tags(tags)
        self.run_id: str = active.info.run_id

    @staticmethod
    def _clean(tags: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in scrub(tags).items() if v is not None}

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return self.outage.call(fn, what)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", lambda: self.mlflow.log_params(scrub(params)))

    def set_tags(self, tags: dict[str, Any]) -> None:
        clean = self._clean(tags)
        self._call("set_tags", lambda: self.mlflow.set_tags(clean))

    def log_dataset(self, source: str, version: str | None, context: str = "training") -> None:
        """The data the run used, as an MLflow dataset input (`tracking.dataset`)."""
        tags = None if version is None else {DATA_VERSION_TAG: str(version)}
        self._call("log_input", lambda: self.mlflow.log_input(dataset(source, version), context=context, tags=tags))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call(f"log_metrics at step {step}", lambda: self.mlflow.log_metrics(metrics, step=step))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._call(f"log_figure {artifact_file}", lambda: self.mlflow.log_figure(figure, artifact_file))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(f"log_artifact {path}", lambda: self.mlflow.log_artifact(str(path), artifact_path))

    def log_model(self, log_fn: Callable[[], Any]) -> Any:
        return self._call("log_model", log_fn)

    def end(self, status: str = "FINISHED") -> None:
        self.outage.call(lambda: self.mlflow.end_run(status=status), "end_run", always=True)
