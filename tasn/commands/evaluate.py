"""Evaluation and registry commands: `tasn evaluate`, `tasn register`, `tasn promote`,
`tasn registry history`, `tasn predict`.

Handlers import their stage module only when run. `tasn promote` exits 3 when the gate refuses
(unless --dry-run), so a shell or CI step can tell a refusal from a failure (1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REFUSED_EXIT = 3


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _setup_tracking(cfg) -> str:
    from tasn import tracking

    return tracking.setup(cfg.tracking)


def _read_json(path: str, what: str) -> dict:
    from tasn.errors import TASNError

    p = Path(path)
    if not p.is_file():
        raise TASNError(f"{what} {p}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise TASNError(f"{what} {p}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TASNError(f"{what} {p}: expected a JSON object")
    return data


def _run_id(args) -> str | None:
    if args.run_id:
        return args.run_id
    if args.run_json:
        return _read_json(args.run_json, "--run-json").get("run_id")
    return None


def _evaluate(args: argparse.Namespace) -> int:
    from tasn.cli import config_from_args
    from tasn.evaluate import evaluate

    cfg = config_from_args(args)
    run_id = _run_id(args)
    if run_id or args.model.startswith(("models:/", "runs:/")):
        _setup_tracking(cfg)
    metrics = evaluate(cfg, args.data or cfg.data.prepared, args.model, args.out, run_id=run_id)
    _print_json(metrics)
    return 0


def _report(decision) -> None:
    """One line for people: stdout when the alias moved (or would), stderr when refused."""
    verb = {"promote": "would promote" if decision.dry_run else "promoted", "refuse": "refused", "unchanged": "unchanged"}
    line = f"{decision.name} v{decision.version} -> {decision.alias}: {verb[decision.decision]}: {decision.reason}"
    print(line, file=sys.stderr if decision.decision == "refuse" else sys.stdout)


def _register(args: argparse.Namespace) -> int:
    from tasn import registry
    from tasn.cli import config_from_args
    from tasn.errors import TASNError
    from tasn.io import atomic_write_json

    cfg = config_from_args(args)
    run = _read_json(args.run_json, "--run-json")
    metrics = _read_json(args.metrics, "--metrics")
    missing = [k for k in ("run_id", "model_uri") if not run.get(k)]
    if missing:
        raise TASNError(f"--run-json {args.run_json}: no {' or '.join(missing)} (was the training run tracked in MLflow?)")
    if run.get("tracking_uri") and not cfg.tracking.uri:
        cfg.tracking.uri = run["tracking_uri"]  # register where the run lives
    _setup_tracking(cfg)
    name = args.name or cfg.register.model_name
    mv = registry.register(run["run_id"], run["model_uri"], metrics, name)
    out = {"name": name, "version": str(mv.version), "run_id": run["run_id"], "model_uri": run["model_uri"],
           "primary_metric": cfg.register.primary_metric, "decision": "not gated",
           "reason": "registered without --promote", "candidate": None, "incumbent": None}
    if args.promote:
        d = registry.gate(name, mv.version, alias=cfg.register.alias, primary_metric=cfg.register.primary_metric)
        _report(d)
        out.update({k: v for k, v in d.to_dict().items() if k != "name"})
    atomic_write_json(Path(args.out) / "registration.json", out)
    _print_json(out)
    return 0  # a refusal is a recorded decision, not a failed stage


def _promote(args: argparse.Namespace) -> int:
    from tasn import registry
    from tasn.cli import config_from_args
    from tasn.errors import TASNError
    from tasn.io import atomic_write_json

    cfg = config_from_args(args)
    if args.force and not (args.reason and args.reason.strip()):
        raise TASNError("--force needs --reason TEXT: a forced promotion records why")
    _setup_tracking(cfg)
    name = args.name or cfg.register.model_name
    if args.to == "production":
        d = registry.to_production(name, args.version, source_alias=cfg.register.alias, reason=args.reason, dry_run=args.dry_run)
    else:
        if args.version is None:
            raise TASNError("--version is required to promote to staging")
        d = registry.gate(name, args.version, alias=cfg.register.alias, primary_metric=cfg.register.primary_metric,
                          force=args.force, reason=args.reason, dry_run=args.dry_run)
    if args.decision_file:
        atomic_write_json(args.decision_file, d.to_dict())
    _report(d)
    return REFUSED_EXIT if d.decision == "refuse" and not args.dry_run else 0


def _history(args: argparse.Namespace) -> int:
    from tasn import registry
    from tasn.cli import config_from_args

    cfg = config_from_args(args)
    _setup_tracking(cfg)
    hist = registry.history(args.name or cfg.register.model_name)
    if args.json:
        _print_json(hist)
        return 0
    rows = [["seq", "when (UTC)", "alias", "version", "previous", "who", "metric", "why"]]
    for r in hist["promotions"]:
        metric = "" if r.get("candidate") is None else f"{r['candidate']:.4g}"
        if r.get("incumbent") is not None:
            metric += f" vs {r['incumbent']:.4g}"
        rows.append([str(r["seq"]), r["when"], r["alias"], r["version"], str(r.get("previous") or "-"),
                     r["who"], metric, ("FORCED " if r.get("forced") else "") + r["why"]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    held = ", ".join(f"{a}=v{v}" for a, v in sorted(hist["aliases"].items())) or "none"
    print(f"\n{hist['name']}: aliases now {held}")
    for problem in hist["problems"]:
        print(f"INCONSISTENT: {problem}")
    return 0 if hist["consistent"] else 1


def _predict(args: argparse.Namespace) -> int:
    from tasn.cli import config_from_args
    from tasn.errors import DataError, TASNError
    from tasn.predict import load_predictor

    cfg = config_from_args(args)
    for path in args.images:
        _check_image(path)
    if args.model.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        _setup_tracking(cfg)
    try:
        predictor = load_predictor(args.model)
    except Exception as exc:  # MLflow raises many kinds for a wrong URI: name the URI
        raise TASNError(f"--model {args.model}: cannot load the model ({exc})") from exc
    try:
        results = predictor.predict(args.images, topk=args.topk)
    except OSError as exc:
        raise DataError(f"cannot read an image: {exc}") from exc
    if args.json:
        _print_json([{"image": p, **r} for p, r in zip(args.images, results)])
        return 0
    for path, res in zip(args.images, results):
        print(path)
        for rank, t in enumerate(res["topk"], 1):
            print(f"  {rank}. {t['class_id']:>4}  {t['class_name']:<30} {t['prob']:.4f}")
    return 0


def _check_image(path: str) -> None:
    """A missing, unreadable or non-image file is named before any model is loaded."""
    from PIL import Image

    from tasn.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    try:
        with Image.open(p) as img:
            img.load()
    except Exception as exc:  # PIL raises several types for broken files
        raise DataError(f"{p}: not a readable image ({exc})") from exc


def add_commands(sub, common) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="test-split accuracy of every head, distillation gap, confusion, speed")
    p.add_argument("--data", default=None, help="prepared data (default: data.prepared)")
    p.add_argument("--model", required=True, metavar="PATH_OR_URI",
                   help="model.pt, or an MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model")
    p.add_argument("--out", default="outputs/evaluate", help="output directory (default: %(default)s)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--run-id", default=None, help="MLflow run to log the results to")
    run.add_argument("--run-json", default=None, help="run.json of `tasn train`, whose run gets the results")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("register", parents=[common], help="register a trained run's model in the MLflow Model Registry")
    p.add_argument("--run-json", "--run", dest="run_json", default="outputs/train/run.json", help="run.json of `tasn train` (default: %(default)s)")
    p.add_argument("--metrics", default="outputs/evaluate/metrics.json", help="metrics.json of `tasn evaluate` (default: %(default)s)")
    p.add_argument("--out", default="outputs/register", help="where registration.json goes (default: %(default)s)")
    p.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
    p.add_argument("--promote", action="store_true", help="then run the staging gate (a refusal still exits 0)")
    p.set_defaults(func=_register)

    p = sub.add_parser("promote", parents=[common], help="champion/challenger gate: move the staging (or production) alias")
    p.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
    p.add_argument("--version", default=None, help="candidate version (for --to production: must be the staging one)")
    p.add_argument("--to", choices=("staging", "production"), default="staging",
                   help="staging: the gate (alias register.alias); production: move the staging version on")
    p.add_argument("--force", action="store_true", help="promote whatever the metrics say (needs --reason)")
    p.add_argument("--reason", default=None, help="why (recorded in the history)")
    p.add_argument("--dry-run", action="store_true", help="decide only; exit 0 whatever the decision")
    p.add_argument("--decision-file", default=None, metavar="PATH", help="write the decision as JSON (for pipelines: promote = true/false)")
    p.set_defaults(func=_promote)

    p = sub.add_parser("registry", help="read the model registry")
    reg_sub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    h = reg_sub.add_parser("history", parents=[common], help="every promotion in order: who, when, why, previous holder")
    h.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
    h.add_argument("--json", action="store_true", help="JSON instead of a table")
    h.set_defaults(func=_history)

    p = sub.add_parser("predict", parents=[common], help="top-k classes of raw images with a logged model")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, metavar="URI", help="e.g. models:/tasn@staging, runs:/ID/model")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.set_defaults(func=_predict)
