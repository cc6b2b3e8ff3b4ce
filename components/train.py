"""`tasn train` as KFP components: the plan (what the train task itself requests) and the train task.

One node: the train task requests G GPUs and runs `torchrun --nproc-per-node G` (one process when
G <= 1). Several nodes: the same task is a small launcher that creates a Kubeflow Trainer `TrainJob`
of N nodes x G GPUs, follows it, fails with the job's reason, and fetches the model (`tasn.launch`).
The plan task computes the train task's requests from (N, G) because KFP has no arithmetic on
pipeline parameters, and a launcher holding G idle GPUs for the whole job would waste them.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def train_plan(num_nodes: int, gpus_per_node: int, cpu: str, memory: str) -> NamedTuple(  # type: ignore[valid-type]
    "Plan", gpus=int, cpu=str, memory=str  # KFP reads its outputs from this functional NamedTuple
):
    """The train task's own requests: all of (G, cpu, memory) on one node, a launcher's otherwise.

    It depends on no other task, so bad cluster parameters fail the run at its start.
    """
    from collections import namedtuple

    from components.runtime import train_requests

    Plan = namedtuple("Plan", ["gpus", "cpu", "memory"])
    return Plan(*train_requests(num_nodes, gpus_per_node, cpu, memory))


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def train(
    prepared: Input[Dataset],
    params_yaml: str,
    profile: str,
    overrides: list,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    accelerator_type: str,
    work_uri: str,
    namespace: str,
    runtime: str,
    job_kind: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train here (one node) or through a TrainJob (several); either way the model lands in `model`.

    Multi-node checkpoints go under `work_uri` (S3), so a retried task or restarted job resumes.
    """
    from components.runtime import log_metrics_json, run_tasn, torchrun_launcher
    from tasn.launch import TrainJobSpec, run_trainjob
    from tasn.training.outputs import METRICS

    if num_nodes == 1:
        launcher = torchrun_launcher(gpus_per_node) if gpus_per_node > 1 else ()
        run_tasn(["train", "--data", prepared.path, "--out", model.path], params_yaml, profile, overrides, launcher)
    else:
        spec = TrainJobSpec(
            image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
            accelerator_type=accelerator_type, data_uri=prepared.uri, work_uri=work_uri,
            params_yaml=params_yaml, profile=profile, overrides=list(overrides), runtime=runtime,
            kind=job_kind,
        )
        run_trainjob(spec, out_dir=model.path, namespace=namespace or None)
    log_metrics_json(metrics, f"{model.path}/{METRICS}")
