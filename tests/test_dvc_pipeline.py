"""dvc.yaml: the five stages call the real `tasn` commands with flags that parse, declare what the
commands read and write, and `dvc repro` runs them for real (smoke config) with a clean
`dvc status` after, metrics and plots that DVC can show, and experiments that change a param."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasn import evaluate
from tasn.cli import build_parser
from tasn.config import Config, load_config
from tasn.registry import REGISTRATION
from tasn.training import outputs

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["validate", "preprocess", "train", "evaluate", "register"]
# flags whose value is a path the stage reads (deps) or writes (outs)
READS = {"--data", "--model", "--run-json", "--metrics"}
WRITES = {"--report-dir", "--out"}


@pytest.fixture(scope="module")
def dvc_yaml():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _argv(stage) -> list[str]:
    argv = shlex.split(stage["cmd"])
    assert argv[0] == "tasn"
    return argv[1:]


def test_the_five_stages_run_real_tasn_commands(dvc_yaml):
    assert list(dvc_yaml["stages"]) == STAGES
    parser = build_parser()
    for name, stage in dvc_yaml["stages"].items():
        argv = _argv(stage)
        assert argv[0] == name
        args = parser.parse_args(argv)  # a renamed or removed flag fails here (SystemExit)
        assert args.command == name


def test_each_command_reads_its_deps_and_writes_its_outs(dvc_yaml):
    for name, stage in dvc_yaml["stages"].items():
        argv = _argv(stage)
        deps = _paths(stage.get("deps"))
        outs = _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
        for flag, value in zip(argv, argv[1:]):
            if flag in READS:
                assert value in deps, f"{name}: reads {value} ({flag}) but does not depend on it"
            if flag in WRITES:
                assert any(o == value or o.startswith(value + "/") for o in outs), f"{name}: writes {value} undeclared"
        for dep in deps:
            if dep.startswith("tasn/"):
                assert (ROOT / dep).is_file(), f"{name}: code dependency {dep} does not exist"


def test_params_are_config_sections_and_metrics_plots_are_stage_outputs(dvc_yaml):
    sections = set(Config().to_dict())
    for name, stage in dvc_yaml["stages"].items():
        for section in stage.get("params", []):
            assert section in sections, f"{name}: params section {section!r} is not in tasn.config.Config"
    metrics = [m for s in dvc_yaml["stages"].values() for m in _paths(s.get("metrics"))]
    assert metrics == [f"outputs/train/{outputs.METRICS}", f"outputs/evaluate/{evaluate.METRICS}"]
    produced = {p for s in dvc_yaml["stages"].values() for p in _paths(s.get("outs"))}
    for plot in dvc_yaml["plots"]:
        (key, spec), = plot.items() if isinstance(plot, dict) else ((plot, None),)
        files = list(spec["y"]) if spec else [key]
        assert all(f in produced for f in files), f"plot {key}: {files} not all produced by a stage"


def _dvc(repo: Path, *args: str, env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_repro_runs_everything_then_status_is_clean_and_experiments_work(tmp_path):
    """The smoke config as the top level of params.yaml, a tiny synthetic sample, a fresh repo."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copytree(ROOT / "tasn", repo / "tasn", ignore=shutil.ignore_patterns("__pycache__"))
    smoke = load_config(ROOT / "params.yaml", "smoke").to_dict()
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    env.pop("PYTHONPATH", None)
    synth = subprocess.run([sys.executable, "-m", "tasn.cli", "data", "synth", "data/raw", "--params", "params.yaml"],
                           cwd=repo, env=env, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stderr[-2000:]
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    _dvc(repo, "init", "-q", env=env)
    _dvc(repo, "config", "core.analytics", "false", env=env)
    git("add", "-A")
    git("commit", "-qm", "baseline")

    _dvc(repo, "repro", env=env)
    status = _dvc(repo, "status", "--json", env=env)
    assert json.loads(status.stdout) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    registration = json.loads((repo / "outputs/register" / REGISTRATION).read_text())
    assert registration["decision"] == "promote" and registration["version"] == "1"  # first model: promoted

    shown = json.loads(_dvc(repo, "metrics", "show", "--json", env=env).stdout)
    data = next(iter(shown.values()))["data"]
    assert {f"outputs/train/{outputs.METRICS}", f"outputs/evaluate/{evaluate.METRICS}"} <= set(data)
    plots = json.loads(_dvc(repo, "plots", "show", "--json", env=env).stdout)["data"]
    assert {"learning curves", "accuracy per head", "per-class accuracy", "confusion"} <= set(plots)
    assert not [k for k, v in plots.items() if not v], "plots with nothing to draw"

    git("add", "-A")
    git("commit", "-qm", "first run")
    _dvc(repo, "exp", "run", "-S", "evaluate.topk=3", env=env)  # only evaluate (and register) rerun
    exps = json.loads(_dvc(repo, "exp", "show", "--json", env=env).stdout)
    topks = [e["data"]["params"]["params.yaml"]["data"]["evaluate"]["topk"]
             for row in exps for e in (row.get("experiments") or []) for e in e["revs"]]
    assert 3 in topks  # the experiment ran with the changed param
    diff = json.loads(_dvc(repo, "params", "diff", "--json", env=env).stdout)
    assert diff["params.yaml"]["evaluate.topk"] == {"old": 5, "new": 3, "diff": -2}
    metrics_diff = json.loads(_dvc(repo, "metrics", "diff", "--all", "--json", env=env).stdout)
    # HEAD's metrics, from the cache
    assert {f"outputs/train/{outputs.METRICS}", f"outputs/evaluate/{evaluate.METRICS}"} <= set(metrics_diff)
