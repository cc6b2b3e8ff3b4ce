"""`tasn train` as KFP components: the plan (what the train task itself requests) and the train task.

One node: the train task requests G GPUs and runs `torchrun --nproc-per-node G` (one process when
G <= 1). Several nodes: the same task is a small launcher that creates a Kubeflow Trainer `TrainJob`
of N nodes x G GPUs, follows it, fails with the job's reason, and fetches the model (`tasn.launch`).
The plan task computes the train task's requests and placement from (N, G) because KFP has no
arithmetic on pipeline parameters, and a launcher holding G idle GPUs for the whole job would waste
them. Its GPU count is a string: the KFP driver reads a resource given as a runtime parameter with
protobuf's GetStringValue (`resolvePodSpecInputRuntimeParameter`, backend/src/v2/driver/resolve.go),
which is "" for a number, and then sets no GPU limit at all.

Either way what must survive a pod lives under `<work_uri>/<KFP run id>` (work_uri "" =
$TASN_WORK_URI from the ConfigMap tasn-s3-config): checkpoints in `checkpoints/`
(`tasn.jobspec.WORK_CHECKPOINTS`, the same place for one node and for a TrainJob), so a retried task
continues where the killed pod stopped; a new run starts its own. A TrainJob's nodes get `node_cpu`
and `node_memory` (the pipeline's `train_cpu`/`train_memory`): the Trainer replaces the runtime's
resources with the job's `resourcesPerNode` wholesale.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def train_plan(num_nodes: int, gpus_per_node: int, cpu: str, memory: str, gpu_node_label: str,
               gpu_taint: str) -> NamedTuple(  # type: ignore[valid-type]
    "Plan", gpus=str, cpu=str, memory=str, node_selector=dict, tolerations=list  # KFP reads its outputs from this
):
    """The train task's own requests and placement: all of (G, cpu, memory) and the GPU nodes'
    selector and tolerations on one node with GPUs, a launcher's footprint otherwise.

    It depends on no other task, so bad cluster parameters fail the run at its start.
    """
    from collections import namedtuple

    from components.runtime import train_placement, train_requests

    Plan = namedtuple("Plan", ["gpus", "cpu", "memory", "node_selector", "tolerations"])
    gpus, cpu, memory = train_requests(num_nodes, gpus_per_node, cpu, memory)
    return Plan(str(gpus), cpu, memory, *train_placement(num_nodes, gpus_per_node, gpu_node_label, gpu_taint))


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def train(
    prepared: Input[Dataset],
    config: str,
    image: str,
    num_nodes: int,
    gpus_per_node: int,
    accelerator_type: str,
    node_cpu: str,
    node_memory: str,
    work_uri: str,
    namespace: str,
    runtime: str,
    job_kind: str,
    kfp_run_id: str,
    mlflow_config_map: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Train here (one node) or through a TrainJob (several); either way the model lands in `model`."""
    from components.runtime import log_metrics_json, run_tasn, run_work_uri, torchrun_launcher
    from tasn import storage
    from tasn.jobspec import WORK_CHECKPOINTS
    from tasn.training.outputs import METRICS

    work = run_work_uri(work_uri, kfp_run_id)
    if num_nodes == 1:
        launcher = torchrun_launcher(gpus_per_node) if gpus_per_node > 1 else ()
        stage = ["train", "--data", prepared.path, "--out", model.path]
        if work:
            stage += ["-S", f"train.checkpoint_dir={storage.join(work, WORK_CHECKPOINTS)}"]
        run_tasn(stage, config, launcher, kfp_run_id=kfp_run_id, mlflow_config_map=mlflow_config_map)
    else:
        from tasn.jobspec import TrainJobSpec, job_name
        from tasn.launch import run_trainjob  # the kubernetes client: seconds

        spec = TrainJobSpec(
            image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
            accelerator_type=accelerator_type, data_uri=prepared.uri, work_uri=work, params_yaml=config,
            runtime=runtime, kind=job_kind, kfp_run_id=kfp_run_id, cpu_per_node=node_cpu,
            memory_per_node=node_memory,
        )
        run_trainjob(spec, out_dir=model.path, namespace=namespace or None, name=job_name(kfp_run_id or work))
    log_metrics_json(metrics, f"{model.path}/{METRICS}")
