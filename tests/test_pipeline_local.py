"""`tasn pipeline run-local`: the whole Kubeflow DAG under kfp.local on the embedded sample (smoke
config), the real stages end to end, ending with a registered model holding the staging alias."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasn import evaluate
from tasn.registry import REGISTRATION
from tasn.training.outputs import MODEL, RUN

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.integration
def test_run_local_runs_the_five_stages_and_promotes(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    params = str(ROOT / "params.yaml")
    tasn = [sys.executable, "-m", "tasn.cli"]
    synth = subprocess.run([*tasn, "data", "synth", "raw", "--params", params, "--profile", "smoke"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stderr[-2000:]
    run = subprocess.run(
        [*tasn, "pipeline", "run-local", "--data", "raw", "--params", params, "--profile", "smoke",
         "--pipeline-root", "root"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    log = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)  # kfp.local colours its status lines
    assert run.returncode == 0, log[-6000:]
    assert "pipeline finished in" in run.stdout
    for task in ("validate", "preprocess", "train", "evaluate", "register", "gate", "promote"):
        assert f"Task '{task}' finished with status SUCCESS" in log, f"{task} did not succeed"

    (run_dir,) = list((tmp_path / "root").iterdir())
    model_dir = run_dir / "train" / "model"
    assert (model_dir / MODEL).is_file() and (model_dir / RUN).is_file()
    evaluation = json.loads((run_dir / "evaluate" / "evaluation" / evaluate.METRICS).read_text())
    registration = json.loads((run_dir / "register" / "registration" / REGISTRATION).read_text())
    decision = json.loads((run_dir / "gate" / "decision").read_text())
    assert decision["promote"] is True and decision["version"] == registration["version"]

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias(registration["name"], "staging")
    assert str(mv.version) == registration["version"]
    run_json = json.loads((model_dir / RUN).read_text())
    assert mv.run_id == run_json["run_id"]
    # evaluate logged its metrics to the training run
    logged = client.get_run(run_json["run_id"]).data.metrics
    primary = "master_aux_top1"
    assert primary in json.dumps(evaluation) and any(primary in k for k in logged)
