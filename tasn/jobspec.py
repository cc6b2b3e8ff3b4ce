"""What a training job on Kubernetes is: `TrainJobSpec` and the objects rendered from it.

`render_trainjob` renders a Kubeflow Trainer v2.1 `TrainJob` of N nodes x G GPUs, each node running
`python -m tasn.launch node`; `render_pytorchjob` the legacy training-operator v1.8 `PyTorchJob`
(Master + Workers) for clusters that have not moved to the Trainer. Both carry the labels the
NetworkPolicies select by and Pod Security "restricted" settings. Pure functions of the spec and
the environment: nothing here talks to the API server (`tasn.launch` does), so every object is
tested offline against the CRD schemas.

Pinned to Trainer v2.1 (`trainer.kubeflow.org/v1alpha1`): v2.1 calls the pod-level overrides
`podTemplateOverrides` (v2.0 called them `podSpecOverrides`; v2.2 replaces them with
`runtimePatches`), so the rendered object is valid for v2.1 only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from tasn import storage
from tasn.errors import TASNError
from tasn.lineage import KFP_RUN_ID_ENV
from tasn.redact import find_credential

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
# Under a run's work prefix (`<work_uri>/<KFP run id>`): node 0's outputs, and the checkpoints that
# `train.checkpoint_dir` points at (one node or many), so a retried task or restarted job resumes.
WORK_OUT, WORK_CHECKPOINTS = "out", "ckpt"


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
        overrides = [tuple(item.partition("=")[::2]) for item in self.overrides]
        for name, value in [(PARAMS_ENV, self.params_yaml), *overrides]:
            why = find_credential(name, value, by_name=name != PARAMS_ENV)
            if why:
                raise TASNError(f"{name} holds a credential ({why}): it would be stored in plain text in the "
                                f"{self.kind}; credentials reach the nodes from the Secrets {self.s3_secret} and "
                                f"{self.mlflow_secret}")


def job_name(key: str) -> str:
    """A stable DNS-1035 name from a key (the pipeline's: its KFP run id): a retried task finds its
    own job again, and the run's exit task finds the job to delete."""
    return "tasn-train-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _env(spec: TrainJobSpec, environ: dict[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": PARAMS_ENV, "value": spec.params_yaml}]
    if spec.kfp_run_id:
        env.append({"name": KFP_RUN_ID_ENV, "value": spec.kfp_run_id})
    for name in FORWARDED_ENV:
        if environ.get(name) and find_credential(name, environ[name]):
            raise TASNError(f"{name} holds a credential: the job's env would keep it in plain text; set the URI "
                            f"without it and the user and password in the Secret {spec.mlflow_secret}")
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
