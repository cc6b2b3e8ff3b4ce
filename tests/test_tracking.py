"""MLflow tracking: where runs go, fail-fast checks, retries, secrets, and a real training run
logged to a real `mlflow server` whose artifacts live on Ceph RGW."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from tasn import checkpoint, cli, lineage, tracking
from tasn.config import TrackingConfig
from tasn.errors import ServiceError
from tasn.predict import Predictor, from_checkpoint, load_predictor
from tasn.training import train
from tasn.training.outputs import CURVES, MODEL, RUN
from tasn.training.stage import run_params


def test_scrub_redacts_credentials_by_name_and_by_value(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    out = tracking.scrub({"AWS_ACCESS_KEY_ID": "AKIA123", "train.lr": 0.1,
                          "note": "endpoint with s3cr3t-value-xyz inside", "db_password": "pw"})
    assert out["AWS_ACCESS_KEY_ID"] == tracking.REDACTED and out["db_password"] == tracking.REDACTED
    assert out["train.lr"] == 0.1
    assert "s3cr3t-value-xyz" not in out["note"] and out["note"].startswith("endpoint with")


def test_a_run_goes_on_when_mlflow_refuses_or_goes_away(caplog):
    """No call is repeated by tasn (MLflow's client retries what a retry can mend); a refusal
    changes nothing; a remote server that failed is left alone for a while."""
    calls = []

    def refused():
        calls.append("refused")
        raise MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)

    def down():
        calls.append("down")
        raise MlflowException("API request to http://mlflow/api failed: connection refused")

    outage = tracking.Outage(remote=True)
    with caplog.at_level(logging.WARNING, logger="tasn.tracking"):
        assert outage.call(refused, "set_tags") is None and outage.call(refused, "set_tags") is None
        assert outage.call(down, "log_metrics") is None and outage.call(down, "log_metrics") is None
        assert tracking.Outage(remote=False).call(lambda: 1 / 0, "end_run") is None
    assert calls == ["refused", "refused", "down"]  # the second call to a server that is down is not made
    assert "MLflow refused set_tags (no such run); not retried" in caplog.text
    assert "the run goes on without MLflow for 300 s" in caplog.text and "end_run failed" in caplog.text


def test_local_default_is_sqlite_with_artifacts_in_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.DVC_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.setup(TrackingConfig())
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"

    exp = mlflow.get_experiment(tracking.experiment_id("tasn-local", uri))
    assert exp.artifact_location == (tmp_path / "mlruns").as_uri()


def test_the_local_store_is_anchored_at_the_project_root(tmp_path, monkeypatch):
    """From a subfolder of a checkout, and from DVC's temporary copy of it (DVC_ROOT names the
    workspace), runs go to the one store at the workspace's root."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "outputs" / "train").mkdir(parents=True)
    monkeypatch.delenv(tracking.DVC_ROOT_ENV, raising=False)
    monkeypatch.chdir(repo / "outputs" / "train")
    assert tracking.resolve_uri(TrackingConfig()) == f"sqlite:///{repo / 'mlflow.db'}"
    assert tracking.local_artifact_root() == (repo / "mlruns").as_uri()
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    temp_copy.mkdir(parents=True)
    (temp_copy / ".dvc").mkdir()
    monkeypatch.chdir(temp_copy)
    monkeypatch.setenv(tracking.DVC_ROOT_ENV, str(repo))
    assert tracking.resolve_uri(TrackingConfig()) == f"sqlite:///{repo / 'mlflow.db'}"
    assert tracking.resolve_uri(TrackingConfig(uri="http://mlflow:5000")) == "http://mlflow:5000"


def test_run_names_tell_runs_apart_or_are_the_dvc_experiment(monkeypatch):
    monkeypatch.delenv(tracking.DVC_EXP_ENV, raising=False)
    names = {tracking.run_name("tasn", "resnet18-slim", 112) for _ in range(20)}
    assert len(names) == 20 and all(re.fullmatch(r"tasn-resnet18-slim-out112-[0-9a-f]{6}", n) for n in names)
    monkeypatch.setenv(tracking.DVC_EXP_ENV, "sulky-doze")
    assert tracking.run_name("baseline", "resnet50", 224) == "sulky-doze"


def test_context_tags_name_the_pipeline_run(monkeypatch):
    monkeypatch.delenv(tracking.DVC_EXP_ENV, raising=False)
    monkeypatch.delenv(tracking.KFP_RUN_ID_ENV, raising=False)
    assert tracking.context_tags() == {}
    monkeypatch.setenv(tracking.KFP_RUN_ID_ENV, "run-7f3")
    monkeypatch.setenv(tracking.DVC_EXP_ENV, "sulky-doze")
    assert tracking.context_tags() == {"kfp.run_id": "run-7f3", "dvc.exp_name": "sulky-doze"}


def test_the_runs_page_is_the_ui_in_its_model_training_mode():
    """MLflow 3.17's UI reads `workflowType` from the address (mlflow/server/js: "machine_learning" is
    its "Model training" switch); without it an experiment opens on the GenAI overview."""
    ui = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    assert any('MACHINE_LEARNING="machine_learning"' in f.read_text(errors="ignore") for f in ui.glob("main.*.js"))
    assert tracking.runs_page("7", "http://host:5000/") == (
        "http://host:5000/#/experiments/7/runs?workflowType=machine_learning")


def test_mlflow_download_bars_are_off_off_a_terminal_unless_the_environment_says(monkeypatch):
    """`make run`'s log, `dvc repro`, a pod: MLflow's artifact bars would be a line per frame there."""
    bar = mlflow.environment_variables.MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, env, shown in ((io.StringIO(), None, False), (Terminal(), None, True), (io.StringIO(), "true", True)):
        monkeypatch.setenv(bar.name, "")
        monkeypatch.delenv(bar.name)
        if env is not None:
            monkeypatch.setenv(bar.name, env)
        monkeypatch.setattr(sys, "stderr", stream)
        cli.quiet_off_terminal()
        assert bar.get() is shown, (stream, env)


def test_a_data_version_is_the_dataset_digest():
    md5 = "87531ab04cff36c47da29bf5b3817baf.dir"
    assert tracking.dataset_digest(md5) == md5  # 36 characters: fits MLflow's digest column
    listing = "s3-listing-sha256:" + "ab" * 32
    assert tracking.dataset_digest(listing) == ("ab" * 32)[:36]
    ds = tracking.dataset("/data/prepared", md5)
    assert (ds.name, ds.digest, ds.source.uri) == ("prepared", md5, "/data/prepared")
    assert tracking.dataset("/data/prepared", "untracked").digest != "untracked"  # MLflow's own then


def test_unreachable_server_fails_fast_before_training(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    cfg = smoke_config(f"tracking.uri=http://127.0.0.1:{port}")
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    with pytest.raises(ServiceError, match=f"127.0.0.1:{port} is not reachable"):
        train(cfg, data, out)
    assert not out.exists()  # nothing started, nothing written


@pytest.mark.integration
def test_training_run_is_fully_tracked_on_mlflow_with_s3(mlflow_s3_server, smoke_data, tmp_path, monkeypatch,  # noqa: F811
                                                         caplog, capfd):
    s3 = mlflow_s3_server.s3
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3.make_bucket()
    cfg = smoke_config(f"tracking.uri={mlflow_s3_server.url}", "tracking.system_metrics=false",
                       "tracking.experiment=tasn-s3-test", "train.max_steps=2", "train.checkpoint_every=1",
                       f"train.checkpoint_dir=s3://{bucket}/ckpt")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = train(cfg, smoke_data, out)
        finally:
            torch.set_num_threads(threads)

    run_info = json.loads((out / RUN).read_text())
    assert run_info["tracking_uri"] == mlflow_s3_server.url and run_info["run_id"] == result.run.run_id
    client = MlflowClient(mlflow_s3_server.url)
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    # the run's real settings as params (what its weights depend on), not every other stage's knobs
    assert set(run.data.params) == set(run_params(cfg, 1))
    assert "tracking.uri" not in run.data.params and "data.synth.classes" not in run.data.params
    assert run.data.tags["machine.threads"] == "1" and run.data.tags["machine.cpu_kernels"]  # what else moves results
    experiment = client.get_experiment(run.info.experiment_id)  # MLflow's kind for model training
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert run.data.params["model.kind"] == "tasn" and run.data.params["train.max_steps"] == "2"
    assert run.data.tags[tracking.GIT_COMMIT_TAG] == lineage.git_commit() and "data.version" in run.data.tags
    assert "git.commit" not in run.data.tags  # MLflow's own tag, not a duplicate
    (used,) = run.inputs.dataset_inputs
    assert json.loads(used.dataset.source)["uri"] == str(smoke_data.resolve())
    # every loss term, lr, throughput, per-head accuracy
    for name in ("loss", "loss_attention", "loss_part", "loss_master", "loss_part_aux", "loss_master_aux",
                 "loss_distill", "lr", "images_per_s", "val_loss", "top1",
                 "attention_top1", "part_top1", "master_top1", "part_aux_top1", "master_aux_top1"):
        assert name in run.data.metrics, name
    assert "epoch" not in run.data.metrics  # every metric is against the step
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    # pictures
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "attention")]
    assert pictures == ["attention/attention_epoch_001.png"]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "art"),
                                                     tracking_uri=mlflow_s3_server.url))
    assert (local / "attention" / "attention_epoch_001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (local / CURVES).is_file()
    # the artifacts really are on RGW, and so are the checkpoints
    objects = [o["Key"] for o in s3.client().list_objects_v2(Bucket=mlflow_s3_server.bucket)["Contents"]]
    assert any(k.endswith("attention_epoch_001.png") for k in objects)
    ckpt = checkpoint.latest_checkpoint(f"s3://{bucket}/ckpt")
    assert ckpt == f"s3://{bucket}/ckpt/ckpt-000000002.pt"
    local_model, _ = checkpoint.load_model(str(out / MODEL))
    for key, value in checkpoint.load_checkpoint(ckpt)["model"].items():
        assert torch.equal(value, local_model.state_dict()[key]), key
    # the logged model is named as the registered model it becomes versions of
    assert client.get_logged_model(run_info["model_uri"].rsplit("/", 1)[-1]).name == cfg.register.model_name
    # the logged model loads (weights only) and predicts like model.pt does
    predictor = load_predictor(run_info["model_uri"]).predictor
    assert isinstance(predictor, Predictor)
    images = sorted((smoke_data.parent / "raw" / "images").rglob("*.jpg"))[:3]
    got = predictor.predict(images, topk=2)
    want = from_checkpoint(str(out / MODEL)).predict(images, topk=2)
    assert [g["class_name"] for g in got] == [w["class_name"] for w in want]
    assert [g["prob"] for g in got] == pytest.approx([w["prob"] for w in want], rel=1e-5)
    assert all(len(g["topk"]) == 2 and g["topk"][0]["prob"] >= g["topk"][1]["prob"] for g in got)
    assert {g["class_name"] for g in got} <= set(predictor.classes)
    # the secret key is nowhere: params, tags, artifacts, logs
    secret = s3.secret_key
    assert all(secret not in str(v) for v in run.data.params.values())
    assert all(secret not in str(v) for v in run.data.tags.values())
    for path in local.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert secret not in caplog.text and secret not in captured.out and secret not in captured.err
