"""The pipeline's exit task: delete the run's multi-node training job, whatever became of the run."""

from kfp import dsl

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def cleanup(num_nodes: int, namespace: str, job_kind: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Delete the TrainJob (or PyTorchJob) the train task launched for this run, if any.

    The pipeline runs it in a `dsl.ExitHandler`, so it runs when the run succeeds, fails, or is
    cancelled: a job left behind would hold its GPUs until someone noticed. The job is named after
    the run id (`tasn.jobspec.job_name`), so this task finds it without asking the train task.
    """
    print(f"run {kfp_run_id} ended {status.state}", flush=True)
    if num_nodes <= 1:
        print("one node: no training job to delete", flush=True)
        return
    from tasn.jobspec import job_name
    from tasn.launch import current_namespace, delete_job, kube_api  # the kubernetes client: seconds

    deleted = delete_job(kube_api(), job_name(kfp_run_id), namespace or current_namespace(), job_kind)
    print(f"{job_kind} {job_name(kfp_run_id)}: {'deleted' if deleted else 'already gone'}", flush=True)
