"""`tasn pipeline compile | run-local | submit | upload`: the Kubeflow door onto the same stages.

Handlers import `pipelines.runner` (and so kfp) when run (see tasn.commands).
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from tasn.commands.common import Subparsers, config_from_args
from tasn.config import find_params
from tasn.errors import TASNError

FAILED_RUN_EXIT = 4  # `submit --wait`: the run ended in another state than SUCCEEDED


def _pipeline_arg(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` (VALUE read as YAML) for any pipeline parameter, e.g. trainjob_namespace=ml."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    try:
        return name.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML ({exc})") from exc


def _kfp_options() -> argparse.ArgumentParser:
    """Where the Kubeflow Pipelines API is."""
    kfp_opts = argparse.ArgumentParser(add_help=False)
    kfp_opts.add_argument("--host", default=None,
                          help="KFP API endpoint, e.g. https://kubeflow.example/pipeline (env KFP_HOST)")
    kfp_opts.add_argument("--token", default=None, help="bearer token (env KFP_TOKEN)")
    kfp_opts.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    return kfp_opts


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    pipe = sub.add_parser("pipeline", help="compile, run locally (kfp.local), submit or upload the Kubeflow pipeline")
    cmds = pipe.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    comp = cmds.add_parser("compile", help="write the pipeline's compiled YAML")
    comp.add_argument("--output", default="pipelines/tasn_pipeline.yaml", help="(default: %(default)s)")
    comp.set_defaults(func=_compile)

    local = cmds.add_parser("run-local", parents=[common],
                            help="run the whole DAG on this machine with kfp.local (SubprocessRunner)")
    local.add_argument("--data", default=None, help="raw CUB-layout dataset (default: data.raw from params)")
    local.add_argument("--pipeline-root", default="outputs/kfp-local", help="task outputs (default: %(default)s)")
    local.add_argument("--work-uri", default=None,
                       help="where checkpoints live, under <work-uri>/<run id> (default: $TASN_WORK_URI, else "
                            "the train task's own output)")
    local.add_argument("--cache", action="store_true",
                       help="serve validate and preprocess from kfp.local's cache when their config and the data "
                            "are unchanged")
    local.set_defaults(func=_run_local)

    kfp_opts = _kfp_options()
    remote = cmds.add_parser("submit", parents=[common, kfp_opts], help="submit a run to a Kubeflow Pipelines endpoint")
    remote.add_argument("--experiment", default="tasn", help="(default: %(default)s)")
    remote.add_argument("--run-name", default=None)
    remote.add_argument("--data-uri", required=True, help="raw dataset, e.g. s3://bucket/tasn/raw")
    remote.add_argument("--pipeline-root", default=None,
                        help="where KFP keeps this run's artifacts, e.g. s3://bucket/kfp (default: the installation's)")
    remote.add_argument("--pipeline-name", default=None,
                        help="upload as a new version of this named pipeline and run that version "
                             "(default: a one-off run of the pipeline compiled here)")
    remote.add_argument("--pipeline-version", default=None, help="the version's name (default: <UTC time>-<commit>)")
    remote.add_argument("--wait", action="store_true",
                        help=f"follow the run to its end; exit {FAILED_RUN_EXIT} unless it succeeded")
    remote.add_argument("--image", default=None, help="project image for every task")
    remote.add_argument("--num-nodes", type=int, default=None)
    remote.add_argument("--gpus-per-node", type=int, default=None)
    remote.add_argument("--accelerator-type", default=None, help="e.g. nvidia.com/gpu")
    remote.add_argument("--train-cpu", default=None, help="CPU request and limit of the train and evaluate tasks")
    remote.add_argument("--train-memory", default=None, help="memory request and limit of the train and evaluate tasks")
    remote.add_argument("--work-uri", default=None,
                        help="s3:// prefix for checkpoints (<work-uri>/<run id>) and multi-node data exchange "
                             "(default: TASN_WORK_URI of the ConfigMap tasn-s3-config)")
    remote.add_argument("--job-kind", choices=("TrainJob", "PyTorchJob"), default=None,
                        help="multi-node job: Kubeflow Trainer v2.1 TrainJob (default) or legacy PyTorchJob")
    remote.add_argument("--pipeline-arg", dest="pipeline_args", action="append", default=[], type=_pipeline_arg,
                        metavar="NAME=VALUE",
                        help="any other pipeline parameter (repeatable), e.g. trainjob_namespace=ml, "
                             "mlflow_config_map=my-mlflow, gpu_node_label=pool=h200")
    remote.set_defaults(func=_submit)

    up = cmds.add_parser("upload", parents=[kfp_opts], help="upload the pipeline as a new version of a named pipeline")
    up.add_argument("--pipeline-name", default="tasn", help="(default: %(default)s)")
    up.add_argument("--pipeline-version", default=None, help="the version's name (default: <UTC time>-<commit>)")
    up.set_defaults(func=_upload)


def _compile(args: argparse.Namespace) -> int:
    from pipelines.runner import compile_pipeline

    print(f"wrote {compile_pipeline(args.output)}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from pipelines.runner import run_local
    from tasn.redact import redact_uri
    from tasn.tracking import runs_page

    cfg = config_from_args(args)  # checks params, profile and overrides before any task starts
    result = run_local(args.data or cfg.data.raw, find_params(args.params), args.profile, args.overrides,
                       args.pipeline_root, cache=args.cache, work_uri=args.work_uri)
    print(f"pipeline finished in {result['seconds']:.0f} s; task outputs under {result['pipeline_root']}, "
          f"their whole logs in {result['log']}")
    print(f"look at the runs and the registry: mlflow ui --backend-store-uri {redact_uri(result['tracking_uri'])}")
    try:  # the address of the runs table is a courtesy: a server gone after the run costs nothing
        experiment = MlflowClient(result["tracking_uri"]).get_experiment_by_name(cfg.tracking.experiment)
    except Exception:
        experiment = None
    if experiment is not None:
        print(f"  then open {runs_page(experiment.experiment_id)} (experiment {cfg.tracking.experiment!r})")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines.runner import submit

    config_from_args(args)  # checks params, profile and overrides before anything is sent
    extra = dict(args.pipeline_args)
    result = submit(
        args.host, args.token, args.data_uri, experiment=args.experiment, run_name=args.run_name,
        params=find_params(args.params), profile=args.profile, overrides=args.overrides, namespace=args.namespace,
        pipeline_root=args.pipeline_root, pipeline_name=args.pipeline_name, pipeline_version=args.pipeline_version,
        wait=args.wait, **{**extra, **_given(args)},
    )
    if "version_id" in result:
        print(f"pipeline {args.pipeline_name!r} version {result['version']} ({result['version_id']})")
    print(f"submitted run {result['run_id']}: {result['url']}")
    if args.wait and result["state"] != "SUCCEEDED":
        raise _RunFailed(f"run {result['run_id']} ended {result['state']}: {result['url']}")
    return 0


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The named cluster flags that were given, as pipeline parameters."""
    names = ("image", "num_nodes", "gpus_per_node", "accelerator_type", "train_cpu", "train_memory", "work_uri",
             "job_kind")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


class _RunFailed(TASNError):
    exit_code = FAILED_RUN_EXIT


def _upload(args: argparse.Namespace) -> int:
    from pipelines.runner import checked_client, upload

    client, text = checked_client(args.host, args.token, args.namespace)
    result = upload(client, args.pipeline_name, args.pipeline_version, namespace=args.namespace, text=text)
    print(f"pipeline {args.pipeline_name!r} ({result['pipeline_id']}): version {result['version']} "
          f"({result['version_id']})")
    return 0
