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

Pinned to Kubeflow Trainer v2.1 (`trainer.kubeflow.org/v1alpha1`): v2.1 calls the pod-level
overrides `podTemplateOverrides` (v2.0 called them `podSpecOverrides`; v2.2 replaces them with
`runtimePatches`), so the rendered object is valid for v2.1 only. `kind="PyTorchJob"` renders the
legacy training-operator v1.8 `PyTorchJob` (`kubeflow.org/v1`, Master + Workers) instead, for
clusters that have not moved to the Trainer.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tasn import storage
from tasn.config import installed_params, write_params
from tasn.errors import ServiceError, TASNError
from tasn.lineage import KFP_RUN_ID_ENV
from tasn.redact import install_log_redaction
from tasn.storage import copy_tree
from tasn.training.outputs import CHECKPOINTS

log = logging.getLogger(__name__)

TRAINER_VERSION = "v2.1.0"
TRAINING_OPERATOR_VERSION = "v1.8.1"
GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"


@dataclass(frozen=True)
class JobKind:
    """Where a job kind lives in the API and which condition means it finished well."""

    kind: str
    group: str
    version: str
    plural: str
    done: str


KINDS = {
    "TrainJob": JobKind("TrainJob", GROUP, VERSION, PLURAL, "Complete"),
    "PyTorchJob": JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "Succeeded"),
}
NODE_JOB = "node"  # the replicated job of the torch runtimes; podTemplateOverrides target it
PARAMS_ENV = "TASN_PARAMS_YAML"
# Passed from the launcher's own environment to every node (values, never secrets).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
WORK_OUT = "out"  # node 0's outputs under work_uri (the job's checkpoints: <work_uri>/checkpoints)
# How long the launcher follows a job by default: within the pipeline's train-task timeout
# (pipelines/tasn_pipeline.py TIMEOUTS), so a stuck job fails the task with a message, not a kill.
FOLLOW_TIMEOUT_S = 6 * 24 * 3600.0


@dataclass
class TrainJobSpec:
    """What the pipeline knows about a multi-node training run."""

    image: str
    num_nodes: int
    gpus_per_node: int
    data_uri: str  # the prepared dataset (s3://...)
    work_uri: str  # s3:// prefix for checkpoints and the finished model
    accelerator_type: str = "nvidia.com/gpu"
    params_yaml: str = ""
    profile: str = ""
    overrides: list[str] = field(default_factory=list)
    runtime: str = "tasn-torch-distributed"  # infra/k8s/base/training-runtime.yaml
    runtime_kind: str = "TrainingRuntime"  # namespaced: the job goes in the runtime's namespace
    cpu_per_node: str = "8"
    memory_per_node: str = "64Gi"
    service_account: str = "tasn-trainer"
    s3_secret: str = "tasn-s3-credentials"  # keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    mlflow_secret: str = "tasn-mlflow-credentials"  # keys MLFLOW_TRACKING_USERNAME and _PASSWORD
    kind: str = "TrainJob"  # or PyTorchJob (legacy training-operator)
    kfp_run_id: str = ""  # the pipeline run's id, as $TASN_KFP_RUN_ID on every node

    def check(self) -> None:
        if self.kind not in KINDS:
            raise TASNError(f"job kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.num_nodes < 1:
            raise TASNError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.gpus_per_node < 0:
            raise TASNError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        for name in ("data_uri", "work_uri"):
            value = getattr(self, name)
            if not storage.is_s3(value):
                raise TASNError(
                    f"{name} must be an s3:// URI that every node can reach for a multi-node run, got {value!r}"
                )


def job_name(key: str) -> str:
    """A stable DNS-1035 name from a key (the pipeline's: its KFP run id): a retried task finds its
    own job again, and the run's exit task finds the job to delete."""
    return "tasn-train-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _env(spec: TrainJobSpec, environ: dict[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": PARAMS_ENV, "value": spec.params_yaml}]
    if spec.kfp_run_id:
        env.append({"name": KFP_RUN_ID_ENV, "value": spec.kfp_run_id})
    env += [{"name": k, "value": environ[k]} for k in FORWARDED_ENV if environ.get(k)]
    secrets = {spec.s3_secret: ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
               spec.mlflow_secret: ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for secret, keys in secrets.items() for key in keys
    ]
    return env


def node_args(spec: TrainJobSpec) -> list[str]:
    """The arguments of `python -m tasn.launch node` on every node."""
    args = ["--data-uri", spec.data_uri, "--work-uri", spec.work_uri]
    if spec.profile:
        args += ["--profile", spec.profile]
    for item in spec.overrides:
        args += ["-S", item]
    return args


NODE_COMMAND = ["python", "-m", "tasn.launch", "node"]
LABELS = {"app.kubernetes.io/name": "tasn", "app.kubernetes.io/component": "train",
          "app.kubernetes.io/managed-by": "tasn-pipeline"}
# The labels infra/k8s/base/networkpolicies.yaml selects training pods by: S3 egress and
# trainer <-> trainer traffic (component trainer), MLflow ingress (tasn/mlflow-client).
POD_LABELS = {"app.kubernetes.io/name": "tasn", "app.kubernetes.io/component": "trainer",
              "tasn/mlflow-client": "true"}
# Pod Security "restricted", as the namespace enforces it (the same as the TrainingRuntime's pods):
# a PyTorchJob has no runtime to inherit it from, so its pods carry it themselves.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
# Writable places on a read-only root: /tmp, the node's data and outputs, shared memory for
# DataLoader workers and NCCL.
SCRATCH = {"/tmp": ("tmp", {"sizeLimit": "2Gi"}), "/workspace": ("workspace", {"sizeLimit": "500Gi"}),
           "/dev/shm": ("dshm", {"medium": "Memory", "sizeLimit": "64Gi"})}


def _resources(spec: TrainJobSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "requests": {"cpu": spec.cpu_per_node, "memory": spec.memory_per_node},
        "limits": {"memory": spec.memory_per_node},
    }
    if spec.gpus_per_node:
        resources["requests"][spec.accelerator_type] = spec.gpus_per_node
        resources["limits"][spec.accelerator_type] = spec.gpus_per_node
    return resources


def _pod_spec(spec: TrainJobSpec) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {"serviceAccountName": spec.service_account}
    if spec.gpus_per_node:
        pod_spec["tolerations"] = [{"key": spec.accelerator_type, "operator": "Exists", "effect": "NoSchedule"}]
    return pod_spec


def render_job(spec: TrainJobSpec, name: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The job object of `spec.kind` for N nodes x G GPUs running `tasn.launch node`."""
    render = render_trainjob if spec.kind == "TrainJob" else render_pytorchjob
    return render(spec, name, environ)


def render_pytorchjob(spec: TrainJobSpec, name: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The legacy PyTorchJob (training-operator v1.8): one Master and N-1 Workers; with
    `nprocPerNode` the operator sets the `PET_*` variables torchrun reads, as the Trainer does."""
    spec.check()
    environ = dict(os.environ if environ is None else environ)
    env = [*_env(spec, environ), {"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/workspace"}]
    container = {"name": "pytorch", "image": spec.image, "command": NODE_COMMAND, "args": node_args(spec),
                 "env": env, "resources": _resources(spec), "securityContext": CONTAINER_SECURITY,
                 "volumeMounts": [{"name": vol, "mountPath": path} for path, (vol, _) in SCRATCH.items()]}
    pod = {**_pod_spec(spec), "automountServiceAccountToken": False, "securityContext": POD_SECURITY,
           "containers": [container],
           "volumes": [{"name": vol, "emptyDir": dict(empty)} for vol, empty in SCRATCH.values()]}

    def replicas(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": dict(POD_LABELS)}, "spec": pod}}

    specs = {"Master": replicas(1)}
    if spec.num_nodes > 1:
        specs["Worker"] = replicas(spec.num_nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": dict(LABELS),
                     "annotations": {"tasn/training-operator-version": TRAINING_OPERATOR_VERSION}},
        "spec": {
            "nprocPerNode": str(max(spec.gpus_per_node, 1)),
            "runPolicy": {"backoffLimit": 3, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": specs,
        },
    }


def render_trainjob(spec: TrainJobSpec, name: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The TrainJob object (Trainer v2.1) for N nodes x G GPUs running `tasn.launch node`."""
    spec.check()
    environ = dict(os.environ if environ is None else environ)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "labels": dict(LABELS),
            "annotations": {"tasn/trainer-version": TRAINER_VERSION},
        },
        "spec": {
            "runtimeRef": {"name": spec.runtime, "apiGroup": GROUP, "kind": spec.runtime_kind},
            "trainer": {
                "image": spec.image,
                "command": NODE_COMMAND,
                "args": node_args(spec),
                "env": _env(spec, environ),
                "numNodes": spec.num_nodes,
                "numProcPerNode": max(spec.gpus_per_node, 1),
                "resourcesPerNode": _resources(spec),
            },
            # The pod's securityContext comes from the runtime (v2.1 overrides cannot set it);
            # the labels are set here too, so the NetworkPolicies match on any runtime.
            "podTemplateOverrides": [{"targetJobs": [{"name": NODE_JOB}], "metadata": {"labels": dict(POD_LABELS)},
                                      "spec": _pod_spec(spec)}],
        },
    }


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
    overrides = [*args.overrides, f"train.checkpoint_dir={storage.join(args.work_uri, CHECKPOINTS)}",
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
