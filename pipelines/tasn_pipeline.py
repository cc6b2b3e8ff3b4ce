"""The TASN Kubeflow pipeline: validate -> preprocess -> train -> evaluate -> register -> gate -> promote.

The same stages as `dvc.yaml`, each a component from `components/` running `tasn <stage>`, wired
flat as in the kfp samples; `tasn pipeline compile` writes the YAML beside this file, and a test
keeps the two in step. What the cluster needs is set here, per task, the Kubernetes way
(kfp-kubernetes, in the compiled YAML's `platforms.kubernetes`):

- environment: the S3 endpoint, region, work prefix and keys for every task that reads or writes
  S3 itself or through its KFP launcher (an artifact outside the pipeline root's bucket, such as the
  imported raw data, is opened with the pod's own credentials: `fetchNonDefaultBuckets` in KFP's
  backend/src/v2/component/launcher_v2.go), the MLflow address and credentials for the tasks that
  talk to MLflow, from the ConfigMaps and Secrets `infra/k8s` creates (their names are pipeline
  parameters); those tasks also carry the pod label the MLflow NetworkPolicy admits
  (`tasn/mlflow-client`). The pipeline root itself is reached through the `kfp-launcher`
  ConfigMap's `providers` (infra/k8s/kfp-profile);
- requests and limits, a timeout and a /tmp volume (the image's root is read-only) on every task;
  the GPU nodes' selector and toleration on a single-node GPU train task (computed by `train-plan`,
  since KFP has no arithmetic on parameters; its GPU count is a string, the only type the driver
  reads into a resource limit); a memory-backed /dev/shm for the DataLoader workers of train and
  evaluate;
- caching per stage: validate and preprocess are cached on their own config section and the data
  version of `data_uri` (the data-version task), so `-S train.lr=...` reruns train and what follows,
  and data changed in place reruns everything; tasks that write to MLflow are never cached;
- retries with backoff on every task that is safe to run again (training resumes from its
  checkpoints under `<work_uri>/<run id>`, register finds its own version again, promote finds the
  alias already moved): Argo's `backoff.maxDuration` is a window from the first attempt's start
  that also becomes each retried pod's deadline, so each task's window covers all its attempts at
  their full timeout (`retry_window`). Which failures are retried is the Argo controller's
  `retryPolicy` (KFP compiles none): docs/cluster.md, "Retries";
- an exit handler that deletes the run's multi-node training job however the run ends.
"""

from kfp import dsl, kubernetes

from components import TASN_IMAGE
from components.cleanup import cleanup
from components.data_version import data_version
from components.evaluate import evaluate
from components.preprocess import preprocess
from components.register import gate, promote, register
from components.train import train, train_plan
from components.validate import validate
from tasn.registry.lock import LOCK_LEASE_S

PIPELINE_NAME = "tasn"
# The project's TrainingRuntime (infra/k8s/base/training-runtime.yaml) and its namespace.
DEFAULT_RUNTIME = "tasn-torch-distributed"
DEFAULT_NAMESPACE = "tasn"
RETRIES = 2  # a pod lost with its node or preempted (which failures Argo retries: docs/cluster.md, "Retries")
# Argo waits BACKOFF_S * BACKOFF_FACTOR**k before retry k+1; KFP sets no `cap`, so the wait grows unbounded.
BACKOFF_S, BACKOFF_FACTOR = 30, 2.0

# What infra/k8s creates in the `tasn` namespace and in each Kubeflow profile namespace.
S3_CONFIG_MAP, S3_SECRET = "tasn-s3-config", "tasn-s3-credentials"
MLFLOW_CONFIG_MAP, MLFLOW_SECRET = "tasn-mlflow-config", "tasn-mlflow-credentials"
S3_CONFIG_KEYS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "TASN_WORK_URI")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_CONFIG_KEYS = ("MLFLOW_TRACKING_URI",)
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# The labels infra/k8s/base/networkpolicies.yaml selects on: MLflow ingress; S3 and API-server
# egress for pipeline pods that run in the `tasn` namespace itself.
MLFLOW_CLIENT_LABEL = ("tasn/mlflow-client", "true")
RUNNER_LABEL = ("app.kubernetes.io/component", "pipeline-runner")
# The tasks whose S3 environment (keys and endpoint) the pod gets: those that touch S3 themselves
# (data, checkpoints, MLflow artifacts) and those whose launcher downloads an artifact from outside
# the pipeline root's bucket (validate and preprocess read the imported raw data).
S3_TASKS = ("data-version", "validate", "preprocess", "train", "evaluate", "register", "gate", "promote")
MLFLOW_TASKS = ("train", "evaluate", "register", "gate", "promote")
# /dev/shm of train and evaluate, memory-backed (a pod's own is 64 MiB, Argo mounts none). The loaders
# keep workers x prefetch (2) batches of float32 images in it per process: the cub profile's evaluation
# batches (8 workers x 2 x 32 x 3 x 512 x 512 x 4 B) are 1.5 GiB per process, 12 GiB for 8 GPUs, 24 for
# 16. Its pages count against the task's memory limit (`train_memory`); the limit here only caps it.
DEV_SHM = "/dev/shm"
SHM_SIZE = "32Gi"
SHM_TASKS = ("train", "evaluate")
# GPU nodes as docs/cluster.md describes them (NVIDIA GPU Operator / device plugin), in kubectl's
# notation (label `key=value[,key=value]`, taint `key:Effect[,...]`): strings, because KFP compiles a
# dict or list default in no fixed key order, and the committed YAML must not change by itself.
GPU_NODE_LABEL = "nvidia.com/gpu.present=true"
GPU_TAINT = "nvidia.com/gpu:NoSchedule"

HOUR = 3600
# activeDeadlineSeconds of each task's pod. The launcher follows a job for at most
# tasn.launch.FOLLOW_TIMEOUT_S (6 days), inside the train task's 7.
TIMEOUTS = {"data-version": HOUR // 2, "validate": 6 * HOUR, "preprocess": 12 * HOUR, "train-plan": 600,
            "train": 7 * 24 * HOUR, "evaluate": 6 * HOUR, "register": HOUR // 2, "gate": HOUR // 2,
            "promote": HOUR // 2, "cleanup": 900}


def backoffs(retries: int, backoff_s: float = BACKOFF_S, factor: float = BACKOFF_FACTOR) -> list[float]:
    """Argo's waits before each retry: `duration * factor**k` (workflow/controller/operator.go,
    processNodeRetries; KFP compiles no `cap`)."""
    return [backoff_s * factor**k for k in range(retries)]


def retries_outlasting(lease_s: float, backoff_s: float = BACKOFF_S, factor: float = BACKOFF_FACTOR) -> int:
    """The fewest retries whose backoffs add up to more than `lease_s`: a task retried that often
    outlives a promotion lock whose holder died."""
    retries = 0
    while sum(backoffs(retries, backoff_s, factor)) <= lease_s:
        retries += 1
    return retries


def retry_window(timeout_s: int, retries: int) -> int:
    """Argo's `backoff.maxDuration` for a task: every attempt at its full timeout plus every wait.

    Argo counts the window from the first attempt's start, gives up on a retry whose wait would end
    after it, and makes its end the deadline of each retried pod (processNodeRetries sets the
    node's executionDeadline), so a shorter window cuts the later attempts short or drops them."""
    return int((retries + 1) * timeout_s + sum(backoffs(retries)))


PROMOTE_RETRIES = retries_outlasting(LOCK_LEASE_S)
# The longest a run can take: every task's whole retry window, one after the other (an upper bound).
RUN_WINDOW_S = sum(retry_window(t, max(RETRIES, PROMOTE_RETRIES)) for t in TIMEOUTS.values())


def build_pipeline(retries: int = RETRIES):
    """The pipeline, with `retries` per task (run-local uses 0: a local failure is not transient,
    and kfp.local would wait out the backoff before reporting it)."""

    def _configure(task, image, cpu, memory, name: str, retries: int = retries, cache: bool = False):
        """Image, requests = limits, timeout, retries with backoff, caching: what every task sets."""
        task.set_container_image(image)
        task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
        # The image runs on a read-only root: the executor's `sh -ec` wrapper (mktemp -d) and KFP's
        # output parameter files (/tmp/kfp/outputs) need a writable /tmp.
        kubernetes.empty_dir_mount(task, volume_name="tmp", mount_path="/tmp")
        kubernetes.set_timeout(task, TIMEOUTS[name])
        kubernetes.add_pod_label(task, *RUNNER_LABEL)
        if retries:
            task.set_retry(num_retries=retries, backoff_duration=f"{BACKOFF_S}s", backoff_factor=BACKOFF_FACTOR,
                           backoff_max_duration=f"{retry_window(TIMEOUTS[name], retries)}s")
        task.set_caching_options(enable_caching=cache)
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="TASN (Trilinear Attention Sampling Network): validate, preprocess, train, evaluate, "
        "register, and promote to staging when the candidate beats the current staging model.",
    )
    def tasn_pipeline(
        data_uri: str,
        validate_config: str = "",
        preprocess_config: str = "",
        train_config: str = "",
        evaluate_config: str = "",
        register_config: str = "",
        image: str = TASN_IMAGE,
        num_nodes: int = 1,
        gpus_per_node: int = 0,
        accelerator_type: str = "nvidia.com/gpu",
        train_cpu: str = "4",
        train_memory: str = "16Gi",
        gpu_node_label: str = GPU_NODE_LABEL,
        gpu_taint: str = GPU_TAINT,
        work_uri: str = "",
        trainjob_namespace: str = DEFAULT_NAMESPACE,
        trainer_runtime: str = DEFAULT_RUNTIME,
        job_kind: str = "TrainJob",
        s3_config_map: str = S3_CONFIG_MAP,
        s3_secret: str = S3_SECRET,
        mlflow_config_map: str = MLFLOW_CONFIG_MAP,
        mlflow_secret: str = MLFLOW_SECRET,
    ):
        """`data_uri`: the raw CUB-layout dataset (s3://... in a cluster, a local path under kfp.local).

        `<stage>_config`: the YAML of the config sections each stage reads (pipelines/stage_configs.py;
        `submit` and `run-local` fill them from your params, profile and overrides; "" = the image's
        params.yaml). One node: the train task requests `gpus_per_node` GPUs of `accelerator_type` on a
        node labelled `gpu_node_label`, tolerating `gpu_taint` (both "" = none); several nodes: it launches a
        TrainJob (or, `job_kind="PyTorchJob"`, a legacy PyTorchJob). Checkpoints (and a multi-node job's
        data and model) live under `<work_uri>/<run id>`; `work_uri` "" = TASN_WORK_URI from
        `s3_config_map`. `*_config_map` / `*_secret`: the ConfigMaps and Secrets the tasks' environment
        comes from.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        def cluster(task, name: str, cpu, memory, retries: int = retries, cache: bool = False):
            """What `name` needs in a cluster: `_configure`, and the S3 and MLflow environment, the
            MLflow client label and the memory-backed /dev/shm where the task's list says so."""
            _configure(task, image, cpu, memory, name, retries, cache)
            if name in S3_TASKS:
                kubernetes.use_config_map_as_env(task, s3_config_map, {k: k for k in S3_CONFIG_KEYS})
                kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in S3_SECRET_KEYS})
            if name in MLFLOW_TASKS:
                kubernetes.use_config_map_as_env(task, mlflow_config_map, {k: k for k in MLFLOW_CONFIG_KEYS})
                kubernetes.use_secret_as_env(task, mlflow_secret, {k: k for k in MLFLOW_SECRET_KEYS})
                kubernetes.add_pod_label(task, *MLFLOW_CLIENT_LABEL)
            if name in SHM_TASKS:
                kubernetes.empty_dir_mount(task, "dshm", DEV_SHM, medium="Memory", size_limit=SHM_SIZE)
            return task

        promote_retries = PROMOTE_RETRIES if retries else 0
        cleaned = cleanup(num_nodes=num_nodes, namespace=trainjob_namespace, job_kind=job_kind, kfp_run_id=run_id)
        cluster(cleaned, "cleanup", "250m", "512Mi")
        with dsl.ExitHandler(cleaned, name="tasn-run"):
            version = cluster(data_version(data_uri=data_uri), "data-version", "500m", "1Gi")
            raw = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw-data")

            checked = validate(data=raw.output, config=validate_config, data_version=version.output)
            cluster(checked, "validate", "2", "4Gi", cache=True)
            prepared_task = preprocess(data=raw.output, config=preprocess_config, data_version=version.output)
            cluster(prepared_task, "preprocess", "4", "8Gi", cache=True)
            prepared_task.after(checked)
            prepared = prepared_task.outputs["prepared"]

            plan = train_plan(num_nodes=num_nodes, gpus_per_node=gpus_per_node, cpu=train_cpu, memory=train_memory,
                              gpu_node_label=gpu_node_label, gpu_taint=gpu_taint)
            cluster(plan, "train-plan", "100m", "256Mi", retries=0)
            trained = train(
                prepared=prepared, config=train_config, image=image, num_nodes=num_nodes,
                gpus_per_node=gpus_per_node, accelerator_type=accelerator_type, node_cpu=train_cpu,
                node_memory=train_memory, work_uri=work_uri, namespace=trainjob_namespace, runtime=trainer_runtime,
                job_kind=job_kind, kfp_run_id=run_id, mlflow_config_map=mlflow_config_map,
            )
            cluster(trained, "train", plan.outputs["cpu"], plan.outputs["memory"])
            trained.set_accelerator_type(accelerator_type).set_accelerator_limit(plan.outputs["gpus"])
            kubernetes.add_node_selector_json(trained, plan.outputs["node_selector"])
            kubernetes.add_toleration_json(trained, plan.outputs["tolerations"])
            trained.after(plan)  # resource channels alone do not order the tasks
            model = trained.outputs["model"]

            scored = evaluate(prepared=prepared, model=model, config=evaluate_config, kfp_run_id=run_id,
                              mlflow_config_map=mlflow_config_map)
            cluster(scored, "evaluate", train_cpu, train_memory)
            registered = register(model=model, evaluation=scored.outputs["evaluation"], config=register_config,
                                  kfp_run_id=run_id, mlflow_config_map=mlflow_config_map)
            cluster(registered, "register", "1", "2Gi")
            name, version_number = registered.outputs["name"], registered.outputs["version"]
            decided = gate(name=name, version=version_number, config=register_config, kfp_run_id=run_id,
                           mlflow_config_map=mlflow_config_map)
            cluster(decided, "gate", "1", "2Gi", retries=promote_retries)
            with dsl.If(decided.outputs["Output"] == True, name="candidate-wins"):  # noqa: E712 (a KFP condition)
                promoted = promote(name=name, version=version_number, config=register_config, kfp_run_id=run_id,
                                   mlflow_config_map=mlflow_config_map)
                cluster(promoted, "promote", "1", "2Gi", retries=promote_retries)

    return tasn_pipeline


tasn_pipeline = build_pipeline()
