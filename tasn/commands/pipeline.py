"""`tasn pipeline compile | run-local | submit`: the Kubeflow door onto the same stages.

Handlers import `pipelines.runner` (and so kfp) when run (see tasn.commands).
"""

from __future__ import annotations

import argparse

from tasn.commands.common import Subparsers, config_from_args
from tasn.config import find_params


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    pipe = sub.add_parser("pipeline", help="compile, run locally (kfp.local) or submit the Kubeflow pipeline")
    cmds = pipe.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    comp = cmds.add_parser("compile", help="write the pipeline's compiled YAML")
    comp.add_argument("--output", default="pipelines/tasn_pipeline.yaml", help="(default: %(default)s)")
    comp.set_defaults(func=_compile)

    local = cmds.add_parser("run-local", parents=[common],
                            help="run the whole DAG on this machine with kfp.local (SubprocessRunner)")
    local.add_argument("--data", default=None, help="raw CUB-layout dataset (default: data.raw from params)")
    local.add_argument("--pipeline-root", default="outputs/kfp-local", help="task outputs (default: %(default)s)")
    local.set_defaults(func=_run_local)

    remote = cmds.add_parser("submit", parents=[common], help="submit a run to a Kubeflow Pipelines endpoint")
    remote.add_argument("--host", default=None,
                        help="KFP API endpoint, e.g. https://kubeflow.example/pipeline (env KFP_HOST)")
    remote.add_argument("--token", default=None, help="bearer token (env KFP_TOKEN)")
    remote.add_argument("--experiment", default="tasn", help="(default: %(default)s)")
    remote.add_argument("--run-name", default=None)
    remote.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    remote.add_argument("--data-uri", required=True, help="raw dataset, e.g. s3://bucket/tasn/raw")
    remote.add_argument("--image", default=None, help="project image for every task")
    remote.add_argument("--num-nodes", type=int, default=None)
    remote.add_argument("--gpus-per-node", type=int, default=None)
    remote.add_argument("--accelerator-type", default=None, help="e.g. nvidia.com/gpu")
    remote.add_argument("--work-uri", default=None, help="s3:// prefix for multi-node checkpoints and outputs")
    remote.add_argument("--job-kind", choices=("TrainJob", "PyTorchJob"), default=None,
                        help="multi-node job: Kubeflow Trainer v2.1 TrainJob (default) or legacy PyTorchJob")
    remote.set_defaults(func=_submit)


def _compile(args: argparse.Namespace) -> int:
    from pipelines.runner import compile_pipeline

    print(f"wrote {compile_pipeline(args.output)}")
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pipelines.runner import run_local
    from tasn.redact import redact_uri
    from tasn.tracking import resolve_uri

    cfg = config_from_args(args)  # checks params, profile and overrides before any task starts
    result = run_local(args.data or cfg.data.raw, find_params(args.params), args.profile, args.overrides,
                       args.pipeline_root)
    print(f"pipeline finished in {result['seconds']:.0f} s; task outputs under {result['pipeline_root']}")
    print(f"look at the runs and the registry: mlflow ui --backend-store-uri {redact_uri(resolve_uri(cfg.tracking))}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines.runner import submit

    config_from_args(args)  # checks params, profile and overrides before anything is sent
    result = submit(
        args.host, args.token, args.data_uri, experiment=args.experiment, run_name=args.run_name,
        params=find_params(args.params), profile=args.profile, overrides=args.overrides, namespace=args.namespace,
        image=args.image, num_nodes=args.num_nodes, gpus_per_node=args.gpus_per_node,
        accelerator_type=args.accelerator_type, work_uri=args.work_uri, job_kind=args.job_kind,
    )
    print(f"submitted run {result['run_id']}: {result['url']}")
    return 0
