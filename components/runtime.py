"""What runs inside a component's container: build and run `tasn <stage>`, then turn its outputs
into KFP metadata.

KFP's local SubprocessRunner runs only lightweight Python components, so every component is a small
Python function (in the project image) that calls `run_tasn` here. Keeping the command building,
metric logging and confusion-matrix reading in this one module means the seven components stay a
few lines each, and the same code runs under `kfp.local`, `kfp.Client` and in the tests.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tasn.config import installed_params, write_params
from tasn.redact import redact_argv


def params_path(params_yaml: str) -> str:
    """The params file a stage reads: the text handed in by the pipeline, else the image's.

    `submit` and `run-local` pass the caller's params.yaml text, so a run uses the knobs the user
    sees and not whatever was baked into the image; an empty string means the image's own file.
    Profiles come with the image (profiles/ beside its params file) or, under run-local, from the
    caller's checkout ($TASN_PROFILES): `--profile NAME` finds them beside the written file.
    """
    if not params_yaml:
        return str(installed_params())
    return str(write_params(params_yaml, Path(tempfile.mkdtemp(prefix="tasn-params-"))))


def tasn_argv(
    stage_args: Sequence[str],
    params_yaml: str = "",
    profile: str = "",
    overrides: Iterable[str] = (),
    launcher: Sequence[str] = (),
) -> list[str]:
    """`tasn <stage> ... --params P [--profile X] [-S k=v ...]` as an argv list.

    `launcher` prefixes the Python module invocation, e.g. torchrun for several GPUs; without one
    the stage runs in this interpreter's environment (`python -m tasn.cli`, the `tasn` script's
    entry point, so no PATH lookup is needed inside the container).
    """
    head = [*launcher, "-m", "tasn.cli"] if launcher else [sys.executable, "-m", "tasn.cli"]
    argv = [*head, *stage_args, "--params", params_path(params_yaml)]
    if profile:
        argv += ["--profile", profile]
    for item in overrides or ():
        argv += ["-S", str(item)]
    return argv


def torchrun_launcher(nproc_per_node: int) -> list[str]:
    """One node, G processes: the single-node multi-GPU path (DDP over NCCL)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}"]


def run_tasn(stage_args: Sequence[str], params_yaml: str = "", profile: str = "",
             overrides: Iterable[str] = (), launcher: Sequence[str] = ()) -> None:
    """Run one stage; its output streams to the task log. A non-zero exit fails the task."""
    argv = tasn_argv(stage_args, params_yaml, profile, overrides, launcher)
    print("+ " + " ".join(redact_argv(argv)), flush=True)  # -S values may be credentials
    code = subprocess.call(argv)
    if code != 0:
        raise RuntimeError(f"`tasn {stage_args[0]}` exited with status {code} (see the log above)")


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
    """Log every numeric value of a stage's metrics/summary JSON to a KFP Metrics artifact."""
    values = numeric_leaves(json.loads(Path(path).read_text()))
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
