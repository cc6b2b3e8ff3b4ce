"""Registry commands: `tasn register`, `tasn promote`, `tasn registry history`.

`tasn promote` exits 3 (`tasn.registry.REFUSED_EXIT`) when the gate refuses (unless --dry-run), so a
shell or CI step can tell a refusal from a failure (1). Handlers import the registry when run (see tasn.commands).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasn.commands.common import Subparsers, config_from_args, print_json

if TYPE_CHECKING:
    from tasn.registry import Decision

TRAIN_OUT, EVALUATE_OUT = "outputs/train", "outputs/evaluate"  # the defaults of `tasn train` / `tasn evaluate`


def _report(decision: Decision) -> None:
    """One line for people: stdout when the alias moved (or would), stderr when refused."""
    verb = {"promote": "would promote" if decision.dry_run else "promoted", "refuse": "refused",
            "unchanged": "unchanged"}
    line = f"{decision.name} v{decision.version} -> {decision.alias}: {verb[decision.decision]}: {decision.reason}"
    print(line, file=sys.stderr if decision.decision == "refuse" else sys.stdout)


def _register(args: argparse.Namespace) -> int:
    from tasn import evaluate, registry
    from tasn.training import outputs

    cfg = config_from_args(args)
    result = registry.register(cfg, args.run_json or Path(TRAIN_OUT) / outputs.RUN,
                               args.metrics or Path(EVALUATE_OUT) / evaluate.METRICS, args.out,
                               name=args.name, promote=args.promote)
    if result.decision is not None:
        _report(result.decision)
    print_json(result.registration)
    return 0  # a refusal is a recorded decision, not a failed stage


def _promote(args: argparse.Namespace) -> int:
    from tasn import registry

    cfg = config_from_args(args)
    decision = registry.promote(cfg, args.version, name=args.name, to=args.to, force=args.force, reason=args.reason,
                                dry_run=args.dry_run, decision_file=args.decision_file)
    _report(decision)
    return registry.REFUSED_EXIT if decision.decision == "refuse" and not args.dry_run else 0


def _history_table(hist: dict[str, Any]) -> list[str]:
    rows = [["seq", "when (UTC)", "alias", "version", "previous", "who", "metric", "why"]]
    for r in hist["promotions"]:
        metric = "" if r.get("candidate") is None else f"{r['candidate']:.4g}"
        if r.get("incumbent") is not None:
            metric += f" vs {r['incumbent']:.4g}"
        rows.append([str(r["seq"]), r["when"], r["alias"], r["version"], str(r.get("previous") or "-"),
                     r["who"], metric, ("WITHDRAWN " if r.get("withdrawn") else "")
                     + ("FORCED " if r.get("forced") else "") + r["why"]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def _history(args: argparse.Namespace) -> int:
    from tasn import registry

    cfg = config_from_args(args)
    hist = registry.promotion_history(cfg, args.name)
    if args.json:
        print_json(hist)
        return 0
    print("\n".join(_history_table(hist)))
    held = ", ".join(f"{a}=v{v}" for a, v in sorted(hist["aliases"].items())) or "none"
    print(f"\n{hist['name']}: aliases now {held}")
    for problem in hist["problems"]:
        print(f"INCONSISTENT: {problem}")
    return 0 if hist["consistent"] else 1


def add_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("register", parents=[common], help="register a trained run's model in the MLflow Model Registry")
    p.add_argument("--run-json", "--run", dest="run_json", default=None,
                   help=f"the run file of `tasn train` (default: the one in {TRAIN_OUT})")
    p.add_argument("--metrics", default=None,
                   help=f"the metrics of `tasn evaluate` (default: the ones in {EVALUATE_OUT})")
    p.add_argument("--out", default="outputs/register",
                   help="where the registration record goes (default: %(default)s)")
    p.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
    p.add_argument("--promote", action="store_true", help="then run the staging gate (a refusal still exits 0)")
    p.set_defaults(func=_register)

    p = sub.add_parser("promote", parents=[common],
                       help="champion/challenger gate: move the staging (or production) alias")
    p.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
    p.add_argument("--version", default=None, help="candidate version (for --to production: must be the staging one)")
    p.add_argument("--to", choices=("staging", "production"), default="staging",
                   help="staging: the gate (alias register.alias); production: move the staging version on")
    p.add_argument("--force", action="store_true", help="promote whatever the metrics say (needs --reason)")
    p.add_argument("--reason", default=None, help="why (recorded in the history)")
    p.add_argument("--dry-run", action="store_true", help="decide only; exit 0 whatever the decision")
    p.add_argument("--decision-file", default=None, metavar="PATH",
                   help="write the decision as JSON (for pipelines: promote = true/false)")
    p.set_defaults(func=_promote)

    p = sub.add_parser("registry", help="read the model registry")
    reg_sub = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    h = reg_sub.add_parser("history", parents=[common],
                           help="every promotion in order: who, when, why, previous holder")
    h.add_argument("--name", default=None, help="registered model name (default: register.model_name)")
    h.add_argument("--json", action="store_true", help="JSON instead of a table")
    h.set_defaults(func=_history)
