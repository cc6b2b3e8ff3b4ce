"""`tasn evaluate`: the test split through a trained model, every number a reviewer asks for.

The handler imports the evaluation stage when run (see tasn.commands).
"""

from __future__ import annotations

import argparse

from tasn.commands.common import Subparsers, config_from_args, print_json


def _evaluate(args: argparse.Namespace) -> int:
    from tasn.evaluate import evaluate

    cfg = config_from_args(args)
    print_json(evaluate(cfg, args.data or cfg.data.prepared, args.model, args.out, run_id=args.run_id,
                        run_json=args.run_json).metrics)
    return 0


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[common],
                       help="test-split accuracy of every head, distillation gap, confusion, speed")
    p.add_argument("--data", default=None, help="prepared data (default: data.prepared)")
    p.add_argument("--model", required=True, metavar="PATH_OR_URI",
                   help="the model file of `tasn train`, or an MLflow model URI: models:/NAME@ALIAS, "
                        "models:/NAME/VERSION, runs:/ID/model")
    p.add_argument("--out", default="outputs/evaluate", help="output directory (default: %(default)s)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--run-id", default=None, help="MLflow run to log the results to")
    run.add_argument("--run-json", default=None,
                     help="the run file of `tasn train`, whose run gets the results (its model must be --model)")
    p.set_defaults(func=_evaluate)
