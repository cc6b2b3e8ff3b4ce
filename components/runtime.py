"""What runs inside a component's container: check the environment the stage needs, build and run
`tasn <stage>`, then turn its outputs into KFP metadata.

KFP's local SubprocessRunner runs only lightweight Python components, so every component is a small
Python function (in the project image) that calls `run_tasn` here. Keeping the command building,
the environment checks, metric logging and confusion-matrix reading in this one module means the
components stay a few lines each, and the same code runs under `kfp.local`, `kfp.Client` and in
the tests.

The environment contract of a task (infra/k8s/client-config; the pipeline maps it with
kfp-kubernetes): `MLFLOW_TRACKING_URI` (+ `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`) for every task that
talks to MLflow, the S3 endpoint, region and keys for every task that touches S3, `TASN_WORK_URI`
as the default work prefix, and `TASN_KFP_RUN_ID`, which the components set for the stages they
run. A task that needs MLflow and cannot reach it fails before its stage starts, naming the
ConfigMap its address comes from: a stage never falls back to a sqlite file inside a pod.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasn import storage, tracking
from tasn.config import installed_params, load_config, write_params
from tasn.errors import ServiceError
from tasn.lineage import KFP_RUN_ID_ENV
from tasn.redact import redact_argv, redact_uri

WORK_URI_ENV = "TASN_WORK_URI"  # tasn-s3-config's default for the pipeline's work_uri
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def params_path(config: str) -> str:
    """The params file a stage reads: the config text handed in by the pipeline, else the image's.

    `submit` and `run-local` resolve params, profile and overrides on the caller's side and hand
    each task the sections its stage reads (pipelines/stage_configs.py); an empty string means the
    image's own params.yaml.
    """
    if not config:
        return str(installed_params())
    return str(write_params(config, Path(tempfile.mkdtemp(prefix="tasn-params-"))))


def tasn_argv(stage_args: Sequence[str], params: str, launcher: Sequence[str] = ()) -> list[str]:
    """`tasn <stage> ... --params P` as an argv list.

    `launcher` prefixes the Python module invocation, e.g. torchrun for several GPUs; without one
    the stage runs in this interpreter's environment (`python -m tasn.cli`, the `tasn` script's
    entry point, so no PATH lookup is needed inside the container).
    """
    head = [*launcher, "-m", "tasn.cli"] if launcher else [sys.executable, "-m", "tasn.cli"]
    return [*head, *stage_args, "--params", params]


def torchrun_launcher(nproc_per_node: int) -> list[str]:
    """One node, G processes: the single-node multi-GPU path (DDP over NCCL)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}"]


def _namespace() -> str:
    path = Path(SA_NAMESPACE_FILE)
    return path.read_text().strip() if path.exists() else "this task's namespace"


def require_tracking(params: str, config_map: str) -> str | None:
    """The MLflow tracking URI this task's stage will use, checked to answer; None when its config
    turns tracking off. A missing or unreachable server is a RuntimeError naming `config_map`,
    the ConfigMap the pipeline maps MLFLOW_TRACKING_URI from."""
    cfg = load_config(params)
    if not cfg.tracking.enabled:
        return None
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    source = (f"the ConfigMap {config_map!r} in namespace {_namespace()} (pipeline parameter mlflow_config_map; "
              "infra/k8s/client-config)")
    if not uri:
        raise RuntimeError(f"this task talks to MLflow, but MLFLOW_TRACKING_URI is not set: it comes from {source}. "
                           "Create it there (kubectl apply -k infra/k8s/kfp-profile) or set tracking.uri")
    try:
        tracking.check_reachable(uri)
    except ServiceError as exc:
        origin = "tracking.uri" if cfg.tracking.uri else f"MLFLOW_TRACKING_URI from {source}"
        raise RuntimeError(f"{exc} (the address is {origin})") from exc
    return uri


def run_tasn(stage_args: Sequence[str], config: str = "", launcher: Sequence[str] = (), kfp_run_id: str = "",
             mlflow_config_map: str = "", ok: Sequence[int] = (0,)) -> int:
    """Run one stage; its output streams to the task log. An exit status not in `ok` fails the task;
    returns the status.

    `mlflow_config_map` (non-empty): the stage talks to MLflow, so the server is checked first.
    `kfp_run_id` reaches the stage as $TASN_KFP_RUN_ID.
    """
    params = params_path(config)
    if mlflow_config_map:
        uri = require_tracking(params, mlflow_config_map)
        print(f"MLflow: {redact_uri(uri)}" if uri else "MLflow: tracking off (tracking.enabled: false)", flush=True)
    argv = tasn_argv(stage_args, params, launcher)
    env = {**os.environ, KFP_RUN_ID_ENV: kfp_run_id} if kfp_run_id else None
    print("+ " + " ".join(redact_argv(argv)), flush=True)  # -S values may be credentials
    code = subprocess.call(argv, env=env)
    if code not in ok:
        raise RuntimeError(f"`tasn {stage_args[0]}` exited with status {code} (see the log above)")
    return code


def run_work_uri(work_uri: str, kfp_run_id: str) -> str:
    """Where a pipeline run keeps what must outlive a pod (checkpoints; a multi-node job's data and
    model): `<work_uri>/<run id>`, with $TASN_WORK_URI when `work_uri` is "" and "" when neither
    is set (single-node training then checkpoints into its own output)."""
    base = work_uri or os.environ.get(WORK_URI_ENV, "")
    if not base:
        return ""
    return storage.join(base, kfp_run_id) if kfp_run_id else base


def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """Flatten a metrics JSON to `a.b.c -> number` (KFP Metrics hold flat scalars only)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(numeric_leaves(value, f"{prefix}{key}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if math.isfinite(obj):
            out[prefix.rstrip(".")] = float(obj)
    return out


def log_metrics_json(artifact: Any, path: str | os.PathLike[str]) -> dict[str, float]:
    """Log every numeric value of a stage's metrics/summary JSON to a KFP Metrics artifact, whose
    file is the JSON itself (so the artifact has content: kfp.local's cache treats an artifact
    without a file as missing, and would rerun the stage)."""
    text = Path(path).read_text()
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text)
    values = numeric_leaves(json.loads(text))
    for name, value in sorted(values.items()):
        artifact.log_metric(name, value)
    return values


def read_confusion(path: str | os.PathLike[str]) -> tuple[list[str], list[list[int]]]:
    """Categories and counts from `confusion.csv` (columns `actual,predicted`, one row a sample).

    That long form is what DVC's confusion template reads; KFP wants the square matrix.
    """
    with open(path, newline="") as fh:
        rows = [(r["actual"], r["predicted"]) for r in csv.DictReader(fh)]
    categories = sorted({a for a, _ in rows} | {p for _, p in rows})
    index = {c: i for i, c in enumerate(categories)}
    matrix = [[0] * len(categories) for _ in categories]
    for actual, predicted in rows:
        matrix[index[actual]][index[predicted]] += 1
    return categories, matrix


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


# GPU counts `set_accelerator_limit` and the device plugins accept per task.
GPU_COUNTS = (0, 1, 2, 4, 8, 16)
LAUNCHER_REQUESTS = ("500m", "1Gi")


def train_requests(num_nodes: int, gpus_per_node: int, cpu: str, memory: str) -> tuple[int, str, str]:
    """(GPUs, cpu, memory) for the train task: the training itself on one node, a launcher's
    small footprint when a TrainJob does the training on several."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if gpus_per_node not in GPU_COUNTS:
        raise ValueError(f"gpus_per_node must be one of {GPU_COUNTS}, got {gpus_per_node}")
    if num_nodes == 1:
        return gpus_per_node, cpu, memory
    return 0, *LAUNCHER_REQUESTS


def node_selector(labels: str) -> dict[str, str]:
    """`key=value[,key=value]` (kubectl's label notation) -> a nodeSelector; "" -> {}."""
    selector = {}
    for item in filter(None, (part.strip() for part in labels.split(","))):
        key, sep, value = item.partition("=")
        if not (sep and key):
            raise ValueError(f"gpu_node_label: {item!r} is not key=value")
        selector[key] = value
    return selector


def tolerations(taints: str) -> list[dict[str, str]]:
    """`key:Effect[,key:Effect]` (kubectl's taint notation, any value) -> tolerations; "" -> []."""
    out = []
    for item in filter(None, (part.strip() for part in taints.split(","))):
        key, sep, effect = item.rpartition(":")
        if not (sep and key) or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"gpu_taint: {item!r} is not key:NoSchedule|PreferNoSchedule|NoExecute")
        out.append({"key": key.split("=", 1)[0], "operator": "Exists", "effect": effect})
    return out


def train_placement(num_nodes: int, gpus_per_node: int, node_label: str,
                    taint: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(nodeSelector, tolerations) of the train task: the GPU nodes' when it trains on GPUs itself;
    none when it trains on CPU or only launches a multi-node job (whose pods carry their own)."""
    selector, tolerated = node_selector(node_label), tolerations(taint)  # bad values fail even when unused
    if num_nodes == 1 and gpus_per_node > 0:
        return selector, tolerated
    return {}, []
