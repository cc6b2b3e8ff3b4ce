"""Compile the TASN pipeline, run it on this machine with kfp.local, or submit it to Kubeflow.

`tasn pipeline compile | run-local | submit | upload` call these. The caller's params file, profile
and overrides are resolved here, on the caller's side, and every task gets the sections its stage
reads (pipelines/stage_configs.py): a cluster run uses the knobs the user sees, not the image's
copy, and the data stages stay cached when only training knobs change.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import kfp
import yaml
from kfp import compiler, local
from kfp.local import logging_utils as local_logging

from pipelines.server import check_server, find_pipeline, server_info
from pipelines.stage_configs import refuse_credentials, stage_configs
from pipelines.tasn_pipeline import (
    MLFLOW_SECRET,
    PIPELINE_NAME,
    RUN_WINDOW_S,
    S3_SECRET,
    build_pipeline,
    tasn_pipeline,
)
from tasn import lineage
from tasn.config import Config, load_config
from tasn.errors import ServiceError, TASNError
from tasn.io import atomic_write_text
from tasn.tracking import resolve_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPILED = PROJECT_ROOT / "pipelines" / "tasn_pipeline.yaml"
# The states in which a KFP run has ended (V2beta1RuntimeState); only SUCCEEDED is a success.
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
WAIT_TIMEOUT_S = float(RUN_WINDOW_S)  # a run retried as often and as long as its tasks may be
POLL_S = 30.0  # between two looks at a run `submit --wait` follows
LOG = "run-local.log"  # under the pipeline root: every task's whole output, as kfp.local printed it
EXECUTOR_INPUT, EXECUTOR_INPUT_END = "Got executor_input:", "    }"  # the JSON a KFP executor logs, indented


def compile_to_text() -> str:
    """The pipeline's IR YAML (deterministic: no timestamps, so it can be committed and diffed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasn_pipeline.yaml"
        compiler.Compiler().compile(tasn_pipeline, str(path))
        return path.read_text()


def compile_pipeline(output: str | os.PathLike[str] = COMPILED) -> Path:
    return atomic_write_text(output, compile_to_text())


def resolve_config(params: str | os.PathLike[str] | None, profile: str | None,
                   overrides: list[str] | None) -> Config:
    """params <- profile <- overrides, checked here, before anything runs."""
    if params is not None and not Path(params).is_file():
        raise TASNError(f"params file {params} does not exist")
    return load_config(params, profile, list(overrides or []))


def arguments(data_uri: str, cfg: Config, **extra: Any) -> dict[str, Any]:
    """The pipeline's arguments: the data, each stage's config sections, and the cluster
    parameters given (None = the pipeline's default)."""
    args: dict[str, Any] = {"data_uri": data_uri, **stage_configs(cfg)}
    args.update({k: v for k, v in extra.items() if v is not None})
    return args


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block (the local tasks inherit them), then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def run_local(data: str | os.PathLike[str], params: str | os.PathLike[str] | None = "params.yaml",
              profile: str | None = None, overrides: list[str] | None = None,
              pipeline_root: str | os.PathLike[str] = "outputs/kfp-local", cache: bool = False,
              **pipeline_args: Any) -> dict[str, Any]:
    """Run the whole DAG here: kfp.local's SubprocessRunner in this interpreter (no venv, no Docker).

    Every task runs `python -m tasn.cli <stage>` with this project on PYTHONPATH and the
    environment a pod gets from the ConfigMaps, taken from this process: MLFLOW_TRACKING_URI (when
    unset: the store `tracking.uri` resolves to, by default `mlflow.db` in the current directory,
    named explicitly so the tasks never pick a store of their own), the S3 settings, TASN_WORK_URI.
    With `cache`, validate and preprocess are served from kfp.local's cache under the pipeline root
    when their config section and the data are unchanged. The console shows each task's log (no
    colour codes off a terminal, no executor input); all of it is in `<pipeline root>/run-local.log`.
    """
    data = Path(data).resolve()
    if not (data / "images.txt").is_file():
        raise TASNError(
            f"{data} is not a CUB-layout dataset (no images.txt): run `dvc pull` for the embedded "
            f"dataset, or `tasn data fashion {data}`"
        )
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config(params, profile, overrides)
    args = arguments(str(data), cfg, **pipeline_args)
    tracking_uri = resolve_uri(cfg.tracking)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=cache)
    # tasks import `components.runtime` and run `python -m tasn.cli`: this checkout, after the user's path
    python_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(PROJECT_ROOT)) if p)
    start = time.monotonic()
    log_path = root / LOG
    try:
        with _environment(PYTHONPATH=python_path, MLFLOW_TRACKING_URI=tracking_uri), _plain_off_terminal(), \
                _console(log_path), warnings.catch_warnings():
            # expected under kfp.local, so said once in docs/pipeline.md rather than per task:
            # resource requests and the image are cluster settings the local runner ignores
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
            warnings.filterwarnings("ignore", message=".*non-Python base image")
            build_pipeline(retries=0)(**args)
    except RuntimeError as exc:  # kfp.local: "Pipeline 'tasn' finished with status FAILURE ..."
        raise TASNError(f"the local pipeline run failed: {_plain(exc)} (task logs above and in {log_path}; "
                        f"outputs under {root})") from exc
    return {"pipeline_root": str(root), "seconds": time.monotonic() - start, "tracking_uri": tracking_uri,
            "log": str(log_path)}


class _Console(io.TextIOBase):
    """What run-local shows while kfp.local runs: everything, less the page of JSON each task's
    KFP executor dumps first (its executor input, at INFO, with no setting to quiet it); the whole
    of it goes to the log file as well."""

    def __init__(self, console: TextIO, full: TextIO):
        self.console, self.full = console, full
        self.pending, self.skipping = "", False

    def write(self, text: str) -> int:
        self.full.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if self.skipping:
                self.skipping = line.rstrip() != EXECUTOR_INPUT_END
            elif line.rstrip().endswith(EXECUTOR_INPUT):
                self.skipping = True
                self.console.write(f"{line} (in {Path(self.full.name).name})\n")
            else:
                self.console.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.full.flush()
        self.console.flush()


@contextlib.contextmanager
def _console(log_path: Path) -> Iterator[None]:
    """For the block, stdout (where kfp.local prints each task's log) through `_Console`."""
    with log_path.open("a", encoding="utf-8") as full, contextlib.redirect_stdout(_Console(sys.stdout, full)):
        yield


@contextlib.contextmanager
def _plain_off_terminal() -> Iterator[None]:
    """kfp.local colours task names and states with terminal codes, wherever its output goes; off a
    terminal (a log file, CI) they are noise, so for the block its colouring returns the text as
    it is (kfp.local has no setting for it)."""
    if sys.stdout.isatty():
        yield
        return
    original = local_logging.color_text
    local_logging.color_text = lambda text, color: text
    try:
        yield
    finally:
        local_logging.color_text = original


def connect(host: str | None, token: str | None, namespace: str | None = None) -> kfp.Client:
    """A kfp.Client for `host` (else $KFP_HOST) with `token` (else $KFP_TOKEN)."""
    host = host or os.environ.get("KFP_HOST")
    token = token or os.environ.get("KFP_TOKEN")
    if not host:
        raise TASNError("no Kubeflow Pipelines endpoint: pass --host or set KFP_HOST")
    try:
        with warnings.catch_warnings():  # "This client only works with KFP v2.0.0-beta.2 and later"
            warnings.simplefilter("ignore", FutureWarning)
            return kfp.Client(host=host, existing_token=token or None, namespace=namespace or "kubeflow")
    except Exception as exc:  # urllib3/requests connection errors, kfp_server_api.ApiException
        raise ServiceError(f"Kubeflow Pipelines at {host} refused or could not be reached: {_short(exc)}") from exc


def checked_client(host: str | None, token: str | None, namespace: str | None) -> tuple[kfp.Client, str]:
    """A client for a server that can run this pipeline (pipelines/server.py: its backend version,
    a namespace on a multi-user server), and the pipeline compiled here."""
    client = connect(host, token, namespace)
    url = _ui_url(host or os.environ.get("KFP_HOST", ""))
    info = server_info(client, url)
    text = compile_to_text()
    check_server(info, url, list(yaml.safe_load_all(text)), namespace)
    return client, text


def upload(client: kfp.Client, name: str = PIPELINE_NAME, version: str | None = None,
           namespace: str | None = None, text: str | None = None) -> dict[str, str]:
    """Upload the compiled pipeline (`text`, else compiled now) as a new version of the pipeline
    `name` in `namespace` (created with this as its first version when it does not exist there
    yet); returns the pipeline's and the version's ids."""
    version = version or default_version_name()
    with tempfile.TemporaryDirectory() as tmp:
        package = str(atomic_write_text(Path(tmp) / "tasn_pipeline.yaml", text or compile_to_text()))
        pipeline_id = find_pipeline(client, name, namespace)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(package, pipeline_name=name, namespace=namespace,
                                                 description=tasn_pipeline.description).pipeline_id
            first = client.list_pipeline_versions(pipeline_id, page_size=1).pipeline_versions[0]
            return {"pipeline_id": pipeline_id, "version_id": first.pipeline_version_id,
                    "version": first.display_name}
        uploaded = client.upload_pipeline_version(package, pipeline_version_name=version, pipeline_id=pipeline_id)
    return {"pipeline_id": pipeline_id, "version_id": uploaded.pipeline_version_id, "version": version}


def default_version_name() -> str:
    """`<UTC time>-<commit>`: sortable, and says which code the version was compiled from."""
    commit = lineage.git_commit(PROJECT_ROOT)
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + (f"-{commit[:12]}" if commit else "")


def submit(host: str | None, token: str | None, data_uri: str, experiment: str = "tasn",
           run_name: str | None = None, params: str | os.PathLike[str] | None = "params.yaml",
           profile: str | None = None, overrides: list[str] | None = None,
           namespace: str | None = None, pipeline_root: str | None = None, pipeline_name: str | None = None,
           pipeline_version: str | None = None, wait: bool = False, wait_timeout_s: float = WAIT_TIMEOUT_S,
           poll_s: float | None = None, **pipeline_args: Any) -> dict[str, Any]:
    """Send the pipeline to a Kubeflow Pipelines endpoint; returns the run id and its URL.

    A one-off run of the pipeline compiled here, or (`pipeline_name`) a run of a new version of
    that named pipeline, uploaded first. With `wait`, follow the run to its end: the result holds
    its final `state`. Refused before anything is sent: an argument that holds a credential, a
    server older than the pipeline needs, a multi-user server without `namespace`.
    """
    args = arguments(data_uri, resolve_config(params, profile, overrides), **pipeline_args)
    refuse_credentials(args, namespace, args.get("s3_secret", S3_SECRET), args.get("mlflow_secret", MLFLOW_SECRET))
    run_name = run_name or f"tasn-{time.strftime('%Y%m%d-%H%M%S')}"
    client, text = checked_client(host, token, namespace)
    url = _ui_url(host or os.environ.get("KFP_HOST", ""))
    result: dict[str, Any] = {}
    try:
        if pipeline_name:
            result.update(upload(client, pipeline_name, pipeline_version, namespace=namespace, text=text))
            exp = client.create_experiment(experiment, namespace=namespace or None)
            run = client.run_pipeline(exp.experiment_id, run_name, params=args, pipeline_id=result["pipeline_id"],
                                      version_id=result["version_id"], pipeline_root=pipeline_root)
        else:
            run = client.create_run_from_pipeline_func(
                tasn_pipeline, arguments=args, run_name=run_name, experiment_name=experiment,
                namespace=namespace or None, pipeline_root=pipeline_root,
            )
    except TASNError:
        raise
    except Exception as exc:  # urllib3/requests connection errors, kfp_server_api.ApiException
        raise ServiceError(f"Kubeflow Pipelines at {url} refused or could not be reached: {_short(exc)}") from exc
    result.update(run_id=run.run_id, url=f"{url}/#/runs/details/{run.run_id}")
    if wait:
        result["state"] = follow_run(client, run.run_id, wait_timeout_s, POLL_S if poll_s is None else poll_s)
    return result


def follow_run(client: kfp.Client, run_id: str, timeout_s: float = WAIT_TIMEOUT_S, poll_s: float = POLL_S,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> str:
    """Poll the run until it ends; its final state (SUCCEEDED, FAILED, CANCELED, ...).

    kfp.Client.wait_for_run_completion does not count CANCELED as an end, so this loop does.
    """
    start, last = clock(), None
    while True:
        try:
            state = str(client.get_run(run_id).state or "PENDING").upper()
        except Exception as exc:
            raise ServiceError(f"lost Kubeflow Pipelines while following run {run_id}: {_short(exc)}") from exc
        if state != last:
            print(f"run {run_id}: {state}", flush=True)
            last = state
        if state in FINAL_STATES:
            return state
        if clock() - start > timeout_s:
            raise ServiceError(f"run {run_id} did not end within {timeout_s:.0f} s (last state {state})")
        sleep(poll_s)


def _ui_url(host: str) -> str:
    prefix = host if host.startswith(("http://", "https://")) else f"http://{host}"
    return prefix.rstrip("/")


def _plain(exc: Exception) -> str:
    """kfp.local's message without its terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
