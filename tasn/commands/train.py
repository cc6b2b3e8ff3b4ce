"""`tasn train`: the training stage (one process, or one per GPU under torchrun)."""

from __future__ import annotations

import json


def add_commands(sub, common) -> None:
    p = sub.add_parser(
        "train", parents=[common], help="train TASN or the baseline (one process or under torchrun)",
        description=(
            "Train on a prepared dataset; write model.pt, checkpoints/, metrics.json, history.csv and "
            "run.json to --out, tracked in MLflow. Many processes: "
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


def _train(args) -> int:
    from tasn.cli import config_from_args
    from tasn.train import train

    cfg = config_from_args(args)
    summary = train(cfg, args.data or cfg.data.prepared, args.out, resume=args.resume)
    if summary:  # rank 0
        print(json.dumps(summary, indent=2, default=str))
    return 0
