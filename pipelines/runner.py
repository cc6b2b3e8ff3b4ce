"""Compile the TASN pipeline, run it on this machine with kfp.local, or submit it to Kubeflow.

`tasn pipeline compile | run-local | submit` call these. Runs get the caller's params.yaml text as
a pipeline argument, so a cluster run uses the knobs the user sees, not the image's copy; a profile
is passed by name and read from the profiles that ship with the image (under run-local: the
caller's, beside its params file).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kfp
from kfp import compiler, local

from pipelines.tasn_pipeline import build_pipeline, tasn_pipeline
from tasn.config import PROFILES_DIR, PROFILES_ENV
from tasn.errors import ServiceError, TASNError
from tasn.io import atomic_write_text

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPILED = PROJECT_ROOT / "pipelines" / "tasn_pipeline.yaml"


def compile_to_text() -> str:
    """The pipeline's IR YAML (deterministic: no timestamps, so it can be committed and diffed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasn_pipeline.yaml"
        compiler.Compiler().compile(tasn_pipeline, str(path))
        return path.read_text()


def compile_pipeline(output: str | os.PathLike[str] = COMPILED) -> Path:
    return atomic_write_text(output, compile_to_text())


def _arguments(data_uri: str, params: str | os.PathLike[str] | None, profile: str | None,
               overrides: list[str] | None, **extra: Any) -> dict[str, Any]:
    params_yaml = ""
    if params:
        path = Path(params)
        if not path.is_file():
            raise TASNError(f"params file {path} does not exist")
        params_yaml = path.read_text()
    args = {"data_uri": data_uri, "params_yaml": params_yaml, "profile": profile or "",
            "overrides": list(overrides or [])}
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
              pipeline_root: str | os.PathLike[str] = "outputs/kfp-local") -> dict[str, Any]:
    """Run the whole DAG here: kfp.local's SubprocessRunner in this interpreter (no venv, no Docker).

    Every task runs `python -m tasn.cli <stage>` with this project on PYTHONPATH; MLflow is whatever
    the stages resolve from the config and the environment (by default `mlflow.db` in the current
    directory), so the promoted model shows up in the same `mlflow ui` as `dvc repro`'s.
    """
    data = Path(data).resolve()
    if not (data / "images.txt").is_file():
        raise TASNError(
            f"{data} is not a CUB-layout dataset (no images.txt): run `dvc pull` for the embedded "
            f"sample, or `tasn data synth {data}`"
        )
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    arguments = _arguments(str(data), params, profile, overrides)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    # tasks import `components.runtime` and run `python -m tasn.cli`: this checkout, after the user's
    # path; a profile name resolves in the caller's profiles folder
    python_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(PROJECT_ROOT)) if p)
    profiles = (Path(params).resolve().parent if params else Path.cwd()) / PROFILES_DIR
    start = time.monotonic()
    try:
        with _environment(PYTHONPATH=python_path, **{PROFILES_ENV: str(profiles)}), warnings.catch_warnings():
            # expected under kfp.local, so said once in docs/pipeline.md rather than per task:
            # resource requests and the image are cluster settings the local runner ignores
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
            warnings.filterwarnings("ignore", message=".*non-Python base image")
            build_pipeline(retries=0)(**arguments)
    except RuntimeError as exc:  # kfp.local: "Pipeline 'tasn' finished with status FAILURE ..."
        raise TASNError(f"the local pipeline run failed: {_plain(exc)} (task logs above; outputs under {root})"
                        ) from exc
    return {"pipeline_root": str(root), "seconds": time.monotonic() - start}


def submit(host: str | None, token: str | None, data_uri: str, experiment: str = "tasn",
           run_name: str | None = None, params: str | os.PathLike[str] | None = "params.yaml",
           profile: str | None = None, overrides: list[str] | None = None,
           namespace: str | None = None, **pipeline_args: Any) -> dict[str, str]:
    """Send the pipeline to a Kubeflow Pipelines endpoint; returns the run id and its URL."""
    host = host or os.environ.get("KFP_HOST")
    token = token or os.environ.get("KFP_TOKEN")
    if not host:
        raise TASNError("no Kubeflow Pipelines endpoint: pass --host or set KFP_HOST")
    arguments = _arguments(data_uri, params, profile, overrides, **pipeline_args)
    run_name = run_name or f"tasn-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        with warnings.catch_warnings():  # "This client only works with KFP v2.0.0-beta.2 and later"
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=host, existing_token=token or None, namespace=namespace or "kubeflow")
        result = client.create_run_from_pipeline_func(
            tasn_pipeline, arguments=arguments, run_name=run_name, experiment_name=experiment,
            namespace=namespace or None,
        )
    except Exception as exc:  # urllib3/requests connection errors, kfp_server_api.ApiException
        raise ServiceError(f"Kubeflow Pipelines at {host} refused or could not be reached: {_short(exc)}") from exc
    prefix = host if host.startswith(("http://", "https://")) else f"http://{host}"
    return {"run_id": result.run_id, "url": f"{prefix.rstrip('/')}/#/runs/details/{result.run_id}"}


def _plain(exc: Exception) -> str:
    """kfp.local's message without its terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
