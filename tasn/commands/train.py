"""`tasn train`: the training stage (one process, or one per GPU under torchrun).

The handler imports the training package when run (see tasn.commands).
"""

from __future__ import annotations

import argparse

from tasn.commands.common import Subparsers, config_from_args, print_json


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train", parents=[common], help="train TASN or the baseline (one process or under torchrun)",
        description=(
            "Train on a prepared dataset; write the model, checkpoints, metrics, per-epoch history and the "
            "MLflow run's ids to --out, tracked in MLflow. Many processes: "
            "`torchrun --nproc-per-node 8 -m tasn.cli train ...`. Resumes from the newest checkpoint "
            "by default (train.resume: auto)."
        ),
    )
    p.add_argument("--data", default=None, metavar="DIR", help="prepared data (default: data.prepared from the config)")
    p.add_argument("--out", default="outputs/train", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="checkpoint path or s3:// URI to continue from; 'auto' (newest in the checkpoint "
                        "folder) or 'never' (default: train.resume)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from tasn.training import train

    cfg = config_from_args(args)
    print_json(train(cfg, args.data or cfg.data.prepared, args.out, resume=args.resume).summary())
    return 0
