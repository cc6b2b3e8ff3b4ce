"""`tasn predict`: the top-k classes of raw images with a logged model.

The handler imports the predictor when run (see tasn.commands).
"""

from __future__ import annotations

import argparse

from tasn.commands.common import Subparsers, bounded_int, config_from_args, print_json


def _predict(args: argparse.Namespace) -> int:
    from tasn.predict import predict_files

    cfg = config_from_args(args)
    results = predict_files(args.model, args.images, args.topk, cfg.tracking)
    if args.json:
        print_json([{"image": p, **r} for p, r in zip(args.images, results)])
        return 0
    for path, res in zip(args.images, results):
        print(path)
        for rank, t in enumerate(res["topk"], 1):
            print(f"  {rank}. {t['class_id']:>4}  {t['class_name']:<30} {t['prob']:.4f}")
    return 0


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("predict", parents=[common], help="top-k classes of raw images with a logged model")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, metavar="URI",
                   help="e.g. models:/tasn@staging, runs:/ID/model, or a model.pt")
    p.add_argument("--topk", type=bounded_int(1, 1000), default=5, help="classes per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.set_defaults(func=_predict)
