"""Multi-node training on Kubernetes: render a Kubeflow Trainer `TrainJob`, create it, follow it.

The pipeline's multi-node train task is a small launcher: it renders a TrainJob of N nodes x G GPUs
(`render_trainjob`), creates it through the kubernetes client, polls its conditions until
`Complete` or `Failed` (`follow`; a failure raises with the job's own reason and message), and
copies the model the job left under `work_uri` back into the task's output.

Each node runs `python -m tasn.launch node`: it fetches the prepared data from S3, runs
`torchrun -m tasn.cli train` (torchrun reads the `PET_*` rendezvous variables the Trainer sets), and
node 0 uploads the outputs. Checkpoints go to `<work_uri>/checkpoints` with `train.resume=auto`, so
a restarted pod, job or pipeline task resumes instead of starting over (the pipeline makes
`work_uri` the run's own, `<work_uri>/<KFP run id>`, and every checkpoint's fingerprint must match
the run's, so another config never continues an old run). The job is named after the KFP run, so a
retried launcher adopts its own job and the pipeline's exit task deletes it (`delete_job`) when
the run ends, fails or is cancelled; `follow` gives up after `FOLLOW_TIMEOUT_S` by default.

The objects themselves (`TrainJobSpec`, the Trainer v2.1 `TrainJob` and the legacy `PyTorchJob`)
are rendered by `tasn.jobspec`; this module is the part that talks to the API server and S3. It
needs the training stage's names, never the stage itself: the pipeline's exit task imports it to
delete a job within 512 MiB, and importing torch alone would take most of that.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tasn import storage
from tasn.config import installed_params, write_params
from tasn.errors import ServiceError, TASNError
from tasn.jobspec import KINDS, PARAMS_ENV, WORK_CHECKPOINTS, WORK_OUT, TrainJobSpec, job_name, render_job
from tasn.redact import install_log_redaction
from tasn.storage import copy_tree

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# How long the launcher follows a job by default: within the pipeline's train-task timeout
# (pipelines/tasn_pipeline.py TIMEOUTS), so a stuck job fails the task with a message, not a kill.
FOLLOW_TIMEOUT_S = 6 * 24 * 3600.0


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and str(cond.get("status")) == "True":
            return cond
    return None


def _api_status(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def create(api, body: dict[str, Any], namespace: str) -> None:
    """Create the job; one that already exists (a retried task) is adopted, not duplicated."""
    k = KINDS[body["kind"]]
    name = body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(k.group, k.version, namespace, k.plural, body)
        log.info("created %s %s/%s", k.kind, namespace, name)
    except Exception as exc:
        if _api_status(exc) == 409:
            log.info("%s %s/%s exists already (a retry): following it", k.kind, namespace, name)
            return
        raise ServiceError(f"could not create {k.kind} {namespace}/{name}: {exc}") from exc


def follow(
    api,
    name: str,
    namespace: str,
    poll_s: float = 15.0,
    timeout_s: float | None = FOLLOW_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    max_api_errors: int = 8,
    kind: str = "TrainJob",
) -> dict[str, Any]:
    """Poll the job until it is done (Complete/Succeeded: returned) or Failed (raised with its reason).

    API hiccups (5xx, connection resets) are retried up to `max_api_errors` times in a row; a job
    that disappears (404) or runs past `timeout_s` (None: no limit) is an error naming the job.
    """
    k = KINDS[kind]
    what = f"{k.kind} {namespace}/{name}"
    start = clock()
    errors = 0
    last_state = None
    while True:
        try:
            obj = api.get_namespaced_custom_object(k.group, k.version, namespace, k.plural, name)
            errors = 0
        except Exception as exc:
            if _api_status(exc) == 404:
                raise ServiceError(f"{what} was deleted while being followed") from exc
            errors += 1
            if errors > max_api_errors:
                raise ServiceError(f"lost the Kubernetes API while following {what}: {exc}") from exc
            log.warning("reading %s failed (%s); retrying", what, exc)
            sleep(poll_s)
            continue
        failed = _condition(obj, "Failed")
        if failed:
            reason = failed.get("reason") or "Failed"
            message = failed.get("message") or "no message"
            raise TASNError(f"{what} failed: {reason}: {message}")
        if _condition(obj, k.done):
            log.info("%s: %s", what, k.done)
            return obj
        conditions = (obj.get("status") or {}).get("conditions") or []
        state = [c.get("type") for c in conditions if str(c.get("status")) == "True"]
        if state != last_state:
            log.info("%s: %s", what, ", ".join(state) or "pending")
            last_state = state
        if timeout_s is not None and clock() - start > timeout_s:
            raise ServiceError(f"{what} did not finish within {timeout_s:.0f} s")
        sleep(poll_s)


def kube_api() -> k8s_client.CustomObjectsApi:
    """A CustomObjectsApi from the in-cluster service account, else the local kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config()
        except Exception as exc:  # no kubeconfig, bad context
            raise ServiceError("no Kubernetes API to create the TrainJob on (no in-cluster config, "
                               f"no kubeconfig): {exc}") from exc
    return k8s_client.CustomObjectsApi()


def current_namespace() -> str:
    path = Path(SA_NAMESPACE_FILE)
    return path.read_text().strip() if path.exists() else "default"


def delete_job(api, name: str, namespace: str, kind: str = "TrainJob") -> bool:
    """Delete the job and, in the foreground, its pods; False when it was not there (any more)."""
    k = KINDS[kind]
    try:
        api.delete_namespaced_custom_object(k.group, k.version, namespace, k.plural, name,
                                            body={"propagationPolicy": "Foreground"})
    except Exception as exc:
        if _api_status(exc) == 404:
            return False
        raise ServiceError(f"could not delete {k.kind} {namespace}/{name}: {exc}") from exc
    log.info("deleted %s %s/%s", k.kind, namespace, name)
    return True


def run_trainjob(spec: TrainJobSpec, out_dir: str, namespace: str | None = None, api=None,
                 poll_s: float = 15.0, timeout_s: float | None = FOLLOW_TIMEOUT_S,
                 name: str | None = None) -> dict[str, Any]:
    """Render the job (`spec.kind`), create (or adopt) it, follow it, fetch the model into `out_dir`.

    `name`: the job's (the pipeline passes `job_name(<KFP run id>)`, which its exit task deletes);
    default: derived from `work_uri` and `out_dir`.
    """
    spec.check()
    api = api or kube_api()
    namespace = namespace or current_namespace()
    name = name or job_name(f"{spec.work_uri}|{out_dir}")
    create(api, render_job(spec, name), namespace)
    obj = follow(api, name, namespace, poll_s=poll_s, timeout_s=timeout_s, kind=spec.kind)
    count = copy_tree(storage.join(spec.work_uri, WORK_OUT), out_dir)
    if not count:
        raise ServiceError(f"{spec.kind} {namespace}/{name} completed but left nothing under "
                           f"{storage.join(spec.work_uri, WORK_OUT)}")
    return obj


def node_main(argv: list[str] | None = None) -> int:
    """One node of the TrainJob: fetch data, torchrun the train stage, node 0 uploads the outputs."""
    parser = argparse.ArgumentParser(prog="python -m tasn.launch node")
    parser.add_argument("--data-uri", required=True)
    parser.add_argument("--work-uri", required=True)
    parser.add_argument("--profile", default="")
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tasn-node-"))
    data, out = work / "data", work / "out"
    text = os.environ.get(PARAMS_ENV, "")
    params = write_params(text, work) if text else installed_params()
    if not copy_tree(args.data_uri, str(data)):
        raise TASNError(f"no prepared data under {args.data_uri}")
    overrides = [*args.overrides, f"train.checkpoint_dir={storage.join(args.work_uri, WORK_CHECKPOINTS)}",
                 "train.resume=auto"]
    argv_ = [sys.executable, "-m", "torch.distributed.run", "-m", "tasn.cli", "train",
             "--data", str(data), "--out", str(out), "--params", str(params)]
    if args.profile:
        argv_ += ["--profile", args.profile]
    for item in overrides:
        argv_ += ["-S", item]
    code = subprocess.call(argv_)
    if code:
        return code
    if os.environ.get("PET_NODE_RANK", os.environ.get("RANK", "0")) == "0":
        copy_tree(str(out), storage.join(args.work_uri, WORK_OUT))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    if len(sys.argv) < 2 or sys.argv[1] != "node":
        sys.exit("usage: python -m tasn.launch node --data-uri S3 --work-uri S3 [--profile P] [-S k=v ...]")
    try:
        sys.exit(node_main(sys.argv[2:]))
    except TASNError as exc:
        print(f"tasn.launch node: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
