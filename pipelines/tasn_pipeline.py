"""The TASN Kubeflow pipeline: validate -> preprocess -> train -> evaluate -> register -> gate -> promote.

The same stages as `dvc.yaml`, each a component from `components/` running `tasn <stage>`. Data
stages are cached (same inputs, same outputs); training, evaluation and the registry are not (they
write to MLflow). Every task retries transient failures; training resumes from its checkpoints.
`tasn pipeline compile` writes the YAML beside this file, and a test keeps the two in step.
"""

from kfp import dsl

from components import TASN_IMAGE
from components.evaluate import evaluate
from components.preprocess import preprocess
from components.register import gate, promote, register
from components.train import train, train_plan
from components.validate import validate

PIPELINE_NAME = "tasn"
# The project's TrainingRuntime (infra/k8s/base/training-runtime.yaml) and its namespace.
DEFAULT_RUNTIME = "tasn-torch-distributed"
DEFAULT_NAMESPACE = "tasn"
RETRIES = 2  # transient failures in a cluster: preempted node, S3 or MLflow hiccup


def build_pipeline(retries: int = RETRIES):
    """The pipeline, with `retries` per task (run-local uses 0: a local failure is not transient,
    and kfp.local would wait out the backoff before reporting it)."""

    def _configure(task, image, cpu, memory, retries: int = retries, cache: bool = False):
        """Image, requests, retries with backoff, caching: what every task sets the same way."""
        task.set_container_image(image)
        task.set_cpu_request(cpu).set_memory_request(memory)
        if retries:
            task.set_retry(num_retries=retries, backoff_duration="30s", backoff_factor=2.0)
        task.set_caching_options(enable_caching=cache)
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="TASN (Trilinear Attention Sampling Network): validate, preprocess, train, evaluate, "
        "register, and promote to staging when the candidate beats the current staging model.",
    )
    def tasn_pipeline(
        data_uri: str,
        params_yaml: str = "",
        profile: str = "",
        overrides: list = [],  # noqa: B006  (KFP compiles the default into the pipeline spec; never mutated)
        image: str = TASN_IMAGE,
        num_nodes: int = 1,
        gpus_per_node: int = 0,
        accelerator_type: str = "nvidia.com/gpu",
        train_cpu: str = "4",
        train_memory: str = "16Gi",
        work_uri: str = "",
        trainjob_namespace: str = DEFAULT_NAMESPACE,
        trainer_runtime: str = DEFAULT_RUNTIME,
        job_kind: str = "TrainJob",
    ):
        """`data_uri`: the raw CUB-layout dataset (s3://... in a cluster, a local path under kfp.local).

        `params_yaml`: the text of a params file ("" = the image's); `profile` and `overrides`
        (`section.key=value`) go to every stage. One node: the train task requests `gpus_per_node` GPUs
        of `accelerator_type`; several nodes: it launches a TrainJob (or, `job_kind="PyTorchJob"`, a
        legacy PyTorchJob) and exchanges data, checkpoints and the model through `work_uri`
        (s3://bucket/prefix).
        """
        common = dict(params_yaml=params_yaml, profile=profile, overrides=overrides)
        raw = dsl.importer(artifact_uri=data_uri, artifact_class=dsl.Dataset, reimport=False)
        raw.set_display_name("raw-data")

        checked = _configure(validate(data=raw.output, **common), image, "2", "4Gi", cache=True)
        prepared_task = _configure(preprocess(data=raw.output, **common), image, "4", "8Gi", cache=True)
        prepared_task.after(checked)
        prepared = prepared_task.outputs["prepared"]

        plan = train_plan(num_nodes=num_nodes, gpus_per_node=gpus_per_node, cpu=train_cpu, memory=train_memory)
        _configure(plan, image, "100m", "256Mi", retries=0)
        trained = train(
            prepared=prepared, image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
            accelerator_type=accelerator_type, work_uri=work_uri, namespace=trainjob_namespace,
            runtime=trainer_runtime, job_kind=job_kind, **common,
        )
        _configure(trained, image, plan.outputs["cpu"], plan.outputs["memory"])
        trained.set_accelerator_type(accelerator_type).set_accelerator_limit(plan.outputs["gpus"])
        trained.after(plan)  # resource channels alone do not order the tasks
        model = trained.outputs["model"]

        scored = _configure(evaluate(prepared=prepared, model=model, **common), image, train_cpu, train_memory)
        registered = _configure(
            register(model=model, evaluation=scored.outputs["evaluation"], **common), image, "1", "2Gi"
        )
        name, version = registered.outputs["name"], registered.outputs["version"]
        decided = _configure(gate(name=name, version=version, **common), image, "1", "2Gi")
        with dsl.If(decided.outputs["Output"] == True, name="candidate-wins"):  # noqa: E712 (a KFP condition)
            _configure(promote(name=name, version=version, **common), image, "1", "2Gi")

    return tasn_pipeline


tasn_pipeline = build_pipeline()
