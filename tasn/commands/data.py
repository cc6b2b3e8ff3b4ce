"""Data commands: `tasn data fashion|synth|details|import-cub|import-folder`, `tasn validate`, `tasn preprocess`.

Each prints its stage's summary as JSON on stdout (validate's without the rules that passed: they
are in its summary.json and report.html). Handlers import their stage module when run
(see tasn.commands).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from tasn.commands.common import Subparsers, bounded_int, config_from_args, print_json
from tasn.config.schema import DEFAULT_MAX_PIXELS, MAX_PIXELS, MAX_SEED, MAX_WORKERS


def _generator(name: str):
    """Handler of `tasn data <name>`: `tasn.data.<name>.generate` with params `data.<name>`."""

    def run(args: argparse.Namespace) -> int:
        generate = importlib.import_module(f"tasn.data.{name}").generate
        cfg = config_from_args(args)
        print_json(generate(args.dest, getattr(cfg.data, name), workers=args.workers, contact_sheet=args.contact_sheet))
        return 0

    return run


def _import_cub(args: argparse.Namespace) -> int:
    from tasn.data.importers import import_cub

    print_json(import_cub(args.src, args.dest, workers=args.workers, max_pixels=args.max_pixels))
    return 0


def _import_folder(args: argparse.Namespace) -> int:
    from tasn.data.importers import import_folder

    print_json(import_folder(args.src, args.dest, test_fraction=args.test_fraction, seed=args.seed,
                             workers=args.workers, max_pixels=args.max_pixels))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from tasn.data.validate import validate, write_suite

    cfg = config_from_args(args)
    if args.write_suite:
        print_json([str(p) for p in write_suite(cfg.validate, args.write_suite)])
        return 0
    result = validate(args.data or cfg.data.raw, args.report_dir or cfg.data.validated, cfg.validate)
    print_json(validation_brief(result.summary, result.report_dir))
    return 0


def validation_brief(summary: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """What a person reads of a passed validation: the counts, how many rules passed and where
    the details are (summary.json holds every rule; a failure is raised with its offenders)."""
    from tasn.data.validate import REPORT, SUMMARY

    rules = summary.get("rules", [])
    return {**{k: v for k, v in summary.items() if k != "rules"}, "rules_passed": sum(r["passed"] for r in rules),
            "report": str(report_dir / REPORT), "details": str(report_dir / SUMMARY)}


def _preprocess(args: argparse.Namespace) -> int:
    from tasn.data.preprocess import preprocess

    cfg = config_from_args(args)
    print_json(preprocess(args.data or cfg.data.raw, args.out or cfg.data.prepared, cfg.preprocess).summary)
    return 0


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", help="create or import a raw dataset (CUB-200-2011 layout)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--workers", type=bounded_int(0, MAX_WORKERS), default=0,
                         help="processes (0 = one per core)")
    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--max-pixels", type=bounded_int(1, MAX_PIXELS), default=DEFAULT_MAX_PIXELS,
                        help="refuse images of more pixels than this (default: %(default)s, as validate.max_pixels)")

    for name, what in (("fashion", "the embedded default: Fashion-MNIST garments placed small in cluttered canvases"),
                       ("synth", "synthetic birds whose class is the texture of small parts"),
                       ("details", "a details set: the class is the texture (and outline) of one part")):
        p = data_sub.add_parser(name, parents=[common, workers], help=f"generate {what} (params: data.{name})")
        p.add_argument("dest", metavar="DEST", help="output directory (replaced atomically), e.g. data/raw")
        p.add_argument("--contact-sheet", default=None, metavar="PNG",
                       help="where to save the contact sheet (default: DEST/contact_sheet.png)")
        p.set_defaults(func=_generator(name))

    p = data_sub.add_parser("import-cub", parents=[workers, limits],
                            help="import a CUB-200-2011 download (bounding boxes and parts are ignored)")
    p.add_argument("src", metavar="SRC", help="the CUB_200_2011 folder (holding images/ and images.txt)")
    p.add_argument("dest", metavar="DEST", help="output directory (replaced atomically)")
    p.set_defaults(func=_import_cub)

    p = data_sub.add_parser("import-folder", parents=[workers, limits],
                            help="import one folder of images per class, with a seeded stratified split")
    p.add_argument("src", metavar="SRC", help="a folder holding one subfolder of images per class")
    p.add_argument("dest", metavar="DEST", help="output directory (replaced atomically)")
    p.add_argument("--test-fraction", type=float, default=0.25,
                   help="share of each class held out for test (default: %(default)s)")
    p.add_argument("--seed", type=bounded_int(0, MAX_SEED), default=0,
                   help="seed of the split (default: %(default)s)")
    p.set_defaults(func=_import_folder)

    p = sub.add_parser("validate", parents=[common],
                       help="build the image manifest and run the great-expectations suite")
    p.add_argument("--data", default=None, metavar="DIR", help="raw CUB-layout dataset (default: data.raw)")
    p.add_argument("--report-dir", default=None, metavar="DIR",
                   help="summary, HTML report and manifest (default: data.validated)")
    p.add_argument("--write-suite", nargs="?", const="gx/expectations", default=None, metavar="DIR",
                   help="write the suite as GX suite files (default DIR: %(const)s) instead of validating")
    p.set_defaults(func=_validate)

    p = sub.add_parser("preprocess", parents=[common],
                       help="resize and pack images into shards for training (no bounding boxes)")
    p.add_argument("--data", default=None, metavar="DIR", help="raw CUB-layout dataset (default: data.raw)")
    p.add_argument("--out", default=None, metavar="DIR", help="prepared output (default: data.prepared)")
    p.set_defaults(func=_preprocess)
