"""One name per output: each file a stage writes is a constant of that stage's module, and the other
doors (dvc.yaml, the KFP components) use the same names: dvc.yaml through its paths (checked here),
the components by importing the constants (checked here, and exercised by test_pipeline.py)."""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import pytest
import yaml

from tasn import evaluate, registry
from tasn.data import preprocess, validate
from tasn.training import outputs

ROOT = Path(__file__).resolve().parents[1]
# Each stage: the module that owns its output names, and the flag of its output folder.
STAGES = {
    "validate": (validate, "--report-dir"),
    "preprocess": (preprocess, "--out"),
    "train": (outputs, "--out"),
    "evaluate": (evaluate, "--out"),
    "register": (registry.stage, "--out"),
}
NAMES = {
    "validate": {validate.SUMMARY, validate.REPORT, validate.MANIFEST},
    "preprocess": {preprocess.MANIFEST, preprocess.CLASSES, preprocess.SUMMARY, preprocess.SHARDS},
    "train": {outputs.MODEL, outputs.METRICS, outputs.RUN, outputs.HISTORY, outputs.STEPS, outputs.CURVES,
              outputs.CHECKPOINTS, outputs.PICTURES},
    "evaluate": {evaluate.METRICS, evaluate.PER_CLASS, evaluate.CONFUSION_CSV, evaluate.CONFUSION_PNG},
    "register": {registry.REGISTRATION},
}
ALL_NAMES = set().union(*NAMES.values())


@pytest.fixture(scope="module")
def dvc_stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _out_dirs(dvc_stages) -> dict[str, PurePosixPath]:
    dirs = {}
    for name, stage in dvc_stages.items():
        argv = stage["cmd"].split()
        dirs[name] = PurePosixPath(argv[argv.index(STAGES[name][1]) + 1])
    return dirs


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _stage_of(path: PurePosixPath, dirs: dict[str, PurePosixPath]) -> str | None:
    return next((name for name, folder in dirs.items() if path.is_relative_to(folder)), None)


def test_dvc_outs_deps_and_plots_are_the_stages_output_names(dvc_stages):
    dirs = _out_dirs(dvc_stages)
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    plotted = [p for plot in plots for p in ([plot] if isinstance(plot, str) else next(iter(plot.values()))["y"])]
    for name, stage in dvc_stages.items():
        produced = _paths(stage.get("outs")) + _paths(stage.get("metrics"))
        read = _paths(stage.get("deps"))
        for path in map(PurePosixPath, produced + read + plotted):
            owner = _stage_of(path, dirs)
            if owner is None:
                assert path.as_posix() in read, f"{name}: {path} is no stage's output"  # data/raw, code
                continue
            rel = path.relative_to(dirs[owner])
            assert rel == PurePosixPath(".") or rel.parts[0] in NAMES[owner], f"{path} is not a {owner} output"


def _literals(tree: ast.AST) -> list[str]:
    """Every string constant in the code, f-string parts included, docstrings excluded."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("path", sorted((ROOT / "components").glob("*.py")), ids=lambda p: p.name)
def test_components_use_the_constants_not_literals(path):
    tree = ast.parse(path.read_text())
    spelled = [s for s in _literals(tree) for n in ALL_NAMES if n in s.split("/")]
    assert not spelled, f"{path.name} spells output names itself: {spelled}"


def test_the_components_import_the_names_of_the_outputs_they_read():
    imported = {}
    for path in (ROOT / "components").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasn."):
                imported.setdefault(path.stem, set()).update(f"{node.module}.{a.name}" for a in node.names)
    assert {"tasn.data.validate.REPORT", "tasn.data.validate.SUMMARY"} <= imported["validate"]
    assert "tasn.data.preprocess.SUMMARY" in imported["preprocess"]
    assert "tasn.training.outputs.METRICS" in imported["train"]
    assert {"tasn.training.outputs.MODEL", "tasn.training.outputs.RUN", "tasn.evaluate.METRICS",
            "tasn.evaluate.CONFUSION_CSV"} <= imported["evaluate"]
    assert {"tasn.training.outputs.RUN", "tasn.evaluate.METRICS", "tasn.registry.REGISTRATION"} <= imported["register"]


def test_each_name_is_spelled_once_in_the_package():
    """Outside its owning module, no code of tasn/ spells an output file name: it imports it."""
    owners = {Path(m.__file__).resolve() for m, _ in STAGES.values()}
    for path in sorted((ROOT / "tasn").rglob("*.py")):
        if path.resolve() in owners:
            continue
        spelled = [s for s in _literals(ast.parse(path.read_text())) if s in ALL_NAMES]
        assert not spelled, f"{path.relative_to(ROOT)} spells {spelled}"
