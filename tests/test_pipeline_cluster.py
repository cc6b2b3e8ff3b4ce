"""The cluster path on this machine: the pipeline's tasks with the environment a pod gets from the
ConfigMaps and Secrets (a real `mlflow server` on loopback with its artifacts on Ceph RGW, the RGW's
S3 endpoint and keys, a work prefix on RGW, the image's TASN_GIT_COMMIT) and no local store anywhere.

- the whole DAG under kfp.local (`tasn pipeline run-local`, smoke config): evaluate finds train's run
  on the server, the model version carries the data's real version and the commit, the staging
  alias is on the server, checkpoints are on S3 under the run's own prefix, and register and
  promote retried in the same run change nothing;
- the train task as a retried pod runs it: killed mid-epoch, run again, it resumes from its S3
  checkpoint; run with another config, it refuses, naming the keys that differ.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fixtures.data_smoke import smoke_data  # noqa: F401  (fixture)
from pipelines.stage_configs import stage_configs
from tasn import checkpoint, evaluate, lineage, storage
from tasn.cli import main as cli_main
from tasn.config import load_config
from tasn.jobspec import WORK_CHECKPOINTS
from tasn.registry import REGISTRATION
from tasn.training.outputs import CHECKPOINTS, METRICS, MODEL, RUN

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
TASN = [sys.executable, "-m", "tasn.cli"]


def pod_env(s3, tracking_uri: str, work_uri: str) -> dict[str, str]:
    """What a task's pod gets from tasn-s3-config, tasn-s3-credentials, tasn-mlflow-config and the
    image (this checkout standing in for the image's install), and nothing of this machine's setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "TASN_"))}
    return {**env, **s3.env(), "MLFLOW_TRACKING_URI": tracking_uri, "TASN_WORK_URI": work_uri,
            lineage.GIT_COMMIT_ENV: COMMIT, "GIT_CEILING_DIRECTORIES": "/", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def stores(*roots: Path) -> set[Path]:
    return {p for root in roots for pattern in ("mlflow.db", "mlruns") for p in root.rglob(pattern)}


def test_the_dag_with_the_pods_environment_tracks_and_registers_on_the_server(mlflow_s3_server, tmp_path,
                                                                             monkeypatch, capsys):
    server, bucket = mlflow_s3_server, mlflow_s3_server.s3.make_bucket()
    for key, value in server.s3.env().items():  # for this test's own look at the bucket
        monkeypatch.setenv(key, value)
    work = f"s3://{bucket}/runs"
    env = pod_env(server.s3, server.url, work)
    before = stores(ROOT)
    synth = subprocess.run([*TASN, "data", "synth", "raw", "--params", str(ROOT / "params.yaml"), "--profile",
                            "smoke"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert synth.returncode == 0, synth.stderr[-2000:]
    run = subprocess.run(
        [*TASN, "pipeline", "run-local", "--data", "raw", "--params", str(ROOT / "params.yaml"), "--profile", "smoke",
         "--pipeline-root", "root", "-S", "train.checkpoint_every=1", "-S", "train.picture_images=0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    log = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
    assert run.returncode == 0, log[-6000:]
    for task in ("data-version", "validate", "preprocess", "train", "evaluate", "register", "gate", "promote",
                 "cleanup"):
        assert f"Task '{task}' finished with status SUCCESS" in log, task
    assert f"look at the runs and the registry: mlflow ui --backend-store-uri {server.url}" in run.stdout

    (run_dir,) = [p for p in (tmp_path / "root").iterdir() if p.name.startswith("tasn-")]
    run_json = json.loads((run_dir / "train" / "model" / RUN).read_text())
    assert run_json["tracking_uri"] == server.url
    client = MlflowClient(server.url)
    # evaluate found train's run on the server and logged its test metrics there
    metrics = client.get_run(run_json["run_id"]).data.metrics
    evaluation = json.loads((run_dir / "evaluate" / "evaluation" / evaluate.METRICS).read_text())
    assert metrics["test_top1"] == pytest.approx(evaluation["top1"])
    # the version carries the data the model was trained on and the image's commit
    registration = json.loads((run_dir / "register" / "registration" / REGISTRATION).read_text())
    name, version = registration["name"], registration["version"]
    mv = client.get_model_version(name, version)
    assert mv.tags["data_version"] == lineage.data_version(tmp_path / "raw") != "unknown"
    assert mv.tags["git_commit"] == COMMIT
    assert client.get_model_version_by_alias(name, "staging").version == version
    # checkpoints went to the run's own prefix on S3, not into the pod
    kfp_run = mv.tags[lineage.KFP_RUN_TAG]
    ckpts = checkpoint.list_checkpoints(storage.join(work, f"{kfp_run}/{WORK_CHECKPOINTS}"))
    assert ckpts and not (run_dir / "train" / "model" / CHECKPOINTS).exists()
    assert stores(tmp_path) == set() and stores(ROOT) == before  # no local store anywhere

    # what a KFP retry of register and promote does in the same run: nothing new
    for key in ("MLFLOW_TRACKING_URI", lineage.KFP_RUN_ID_ENV):
        monkeypatch.setenv(key, {**env, lineage.KFP_RUN_ID_ENV: kfp_run}[key])
    params = tmp_path / "register.yaml"
    params.write_text(stage_configs(load_config(ROOT / "params.yaml", "smoke"))["register_config"])
    assert cli_main(["register", "--run-json", str(run_dir / "train" / "model" / RUN), "--metrics",
                     str(run_dir / "evaluate" / "evaluation" / evaluate.METRICS), "--out", str(tmp_path / "again"),
                     "--params", str(params)]) == 0
    assert json.loads((tmp_path / "again" / REGISTRATION).read_text())["version"] == version
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [version]
    assert cli_main(["promote", "--name", name, "--version", version, "--params", str(params)]) == 0
    assert f"v{version} -> staging: unchanged" in capsys.readouterr().out
    promotions = [k for k in client.get_model_version(name, version).tags if k.startswith("promotion.")]
    assert len(promotions) == 1  # one history record: the retry moved nothing


TRAIN_POD = textwrap.dedent('''
    """The train task's body as a pod runs it: the component's function, its artifacts local paths."""
    import sys
    from kfp import dsl
    from components.train import train
    prepared, model, metrics, config, work_uri = sys.argv[1:6]
    train.python_func(prepared=dsl.Dataset(uri=prepared), config=open(config).read(), image="", num_nodes=1,
                      gpus_per_node=0, accelerator_type="nvidia.com/gpu", node_cpu="1", node_memory="1Gi",
                      work_uri=work_uri, namespace="", runtime="",
                      job_kind="TrainJob", kfp_run_id="run-7", mlflow_config_map="tasn-mlflow-config",
                      model=dsl.Model(uri=model), metrics=dsl.Metrics(uri=metrics))
''')


def test_a_retried_train_task_resumes_from_its_s3_checkpoint_and_refuses_another_config(
        s3_server, smoke_data, tmp_path):  # noqa: F811
    bucket = s3_server.make_bucket()
    env = pod_env(s3_server, "http://127.0.0.1:9", "")  # tracking off below: no server needed
    script = tmp_path / "train_pod.py"
    script.write_text(TRAIN_POD)
    # 12 steps in one epoch, a checkpoint after each: nearly every checkpoint is mid-epoch
    overrides = ["train.batch_size=2", "train.checkpoint_every=1", "train.picture_images=0", "tracking.enabled=false"]

    def pod(attempt: str, *more: str) -> subprocess.Popen:
        config = tmp_path / f"{attempt}.yaml"
        cfg = load_config(ROOT / "params.yaml", "smoke", [*overrides, *more])
        config.write_text(stage_configs(cfg)["train_config"])
        out = tmp_path / attempt
        return subprocess.Popen([sys.executable, str(script), str(smoke_data), str(out / "model"),
                                 str(out / "metrics"), str(config), f"s3://{bucket}/runs"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    prefix = f"s3://{bucket}/runs/run-7/{WORK_CHECKPOINTS}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        first = pod("attempt-1")
        deadline = time.monotonic() + 300
        while not checkpoint.list_checkpoints(prefix) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the node is gone: the task's process and the stage it runs
        log = first.communicate()[0]
        assert first.returncode == -signal.SIGKILL, log[-3000:]
        assert not (tmp_path / "attempt-1" / "model" / MODEL).exists()
        state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(prefix))
        assert state["epoch"] == 0 and 0 < state["batch"] < 12, (state["epoch"], state["batch"])  # mid-epoch

        second = pod("attempt-2")  # KFP's retry: a new pod, a new output folder, the same run
        log = second.communicate(timeout=600)[0]
        assert second.returncode == 0, log[-3000:]
        resumed = rf"resuming from {re.escape(prefix)}/ckpt-0*{state['step']}\.pt at epoch 1, batch {state['batch']}"
        assert re.search(resumed, log), log[-3000:]
        done = json.loads((tmp_path / "attempt-2" / "model" / METRICS).read_text())
        assert (done["epochs"], done["steps"]) == (1, 12)  # the whole run, no step lost or repeated

        third = pod("attempt-3", "train.lr=0.2", "model.att_size=48")  # another config, the same run's prefix
        log = third.communicate(timeout=600)[0]
        assert third.returncode != 0
        stage_output = log[log.index("+ "):log.index("Traceback")]  # before the component's own raise
        assert "tasn train: error:" in stage_output and "was written by a run of another config or data" in log
        assert "train.lr (0.1 -> 0.2)" in stage_output and "model.att_size (64 -> 48)" in stage_output
