"""Who may touch the registry, and where credentials and object keys may go.

- Redaction (`tasn.redact`): URI userinfo and secret `-S` values in params, argv, echoes, logs.
- `copy_tree` containment: hostile object keys write nothing outside the destination, from a local
  folder and from Ceph RGW; and its S3 branch against RGW in both directions the launcher uses.
- MLflow access: a real `mlflow server --app-name basic-auth` on a real PostgreSQL, set up as in
  infra/k8s. A real smoke training run is tracked there by the pipeline's account (credentials in
  the tracking URI), registered and promoted by `tasn register --promote` (credentials in the
  environment); an account with the default READ permission can neither register nor move
  `@staging`; and no password appears in params, tags, artifacts, output files or logs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import uuid
import zlib
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from components.runtime import run_tasn
from fixtures.data_smoke import smoke_data  # noqa: F401  (fixture)
from fixtures.models import baseline_model
from fixtures.servers import Account
from tasn import evaluate, redact, serving, storage, tracking
from tasn.checkpoint import fingerprint, save_checkpoint, save_model
from tasn.cli import main
from tasn.config import TrackingConfig, load_config
from tasn.errors import DataError, ServiceError
from tasn.jobspec import PARAMS_ENV, WORK_OUT
from tasn.launch import node_main
from tasn.model import build_model
from tasn.predict import from_checkpoint
from tasn.pyfunc_model import TASNClassifier
from tasn.registry import REGISTRATION, alias_holder, lock
from tasn.training.outputs import MODEL, RUN

ROOT = Path(__file__).resolve().parents[1]
CREDENTIAL_ENV = (tracking.USER_ENV, tracking.PASSWORD_ENV, "MLFLOW_TRACKING_URI")


@pytest.fixture
def no_credentials(monkeypatch):
    """No MLflow account in the environment, and whatever a test (or `tracking.setup`, which moves
    a URI's userinfo there) sets is undone afterwards."""
    for name in CREDENTIAL_ENV:
        monkeypatch.setenv(name, "")  # recorded, so the delete below is undone even if set later
        monkeypatch.delenv(name)


# -- redaction ----------------------------------------------------------------------------------

def test_uri_userinfo_is_redacted_inside_any_text():
    text = ('tracking https://ci:tok3n@mlflow.example:5000/api and db postgresql://u:p@ss@db/mlflow, '
            '{"a":"https://host/x","who":"alice@host"} git ssh://git@github.com/o/r mail bob@example.com')
    assert redact.redact_uri(text) == (
        'tracking https://***@mlflow.example:5000/api and db postgresql://***@db/mlflow, '
        '{"a":"https://host/x","who":"alice@host"} git ssh://***@github.com/o/r mail bob@example.com')
    assert redact.redact_uri("https://token-only@h") == "https://***@h"
    assert redact.split_userinfo("https://us%40er:p%2Fw@host:5000/x?q=1") == ("https://host:5000/x?q=1", "us@er", "p/w")
    assert redact.split_userinfo("http://host:5000") == ("http://host:5000", None, None)


def test_secret_names_and_values_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789")
    monkeypatch.setenv("SOME_FLAG_TOKEN", "1")  # too short to be a secret: not redacted everywhere
    names = ["api_key", "apikey", "SECRET_KEY", "AWS_ACCESS_KEY_ID", "db.password", "x.passwd", "GITHUB_TOKEN",
             "GOOGLE_CREDENTIALS", "keep_checkpoints", "monkey", "keyboard", "PWD", "train.lr", "tracking.uri"]
    assert [n for n in names if redact.is_secret_name(n)] == names[:8]
    out = redact.redact_mapping({"AWS_SECRET_ACCESS_KEY": "short", "db_password": "pw", "train.lr": 0.1,
                                 "train.epochs": 1, "note": "a tok-0123456789 inside",
                                 "tracking.uri": "https://ci:pw@h:5000"})
    assert out == {"AWS_SECRET_ACCESS_KEY": "***", "db_password": "***", "train.lr": 0.1, "train.epochs": 1,
                   "note": "a *** inside", "tracking.uri": "https://***@h:5000"}
    assert tracking.scrub({"x.token": "abc", "y": 2}) == {"x.token": tracking.REDACTED, "y": 2}


def test_printed_argv_hides_secret_overrides_and_flags(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "ci-password-42")
    argv = ["python", "-m", "tasn.cli", "train", "--data", "s3://b/prepared", "-S", "train.lr=0.05",
            "-S", "tracking.uri=https://ci:ci-password-42@mlflow:5000", "-S", "extra.api_key=abc",
            "--set=db.password=pw", "-Sx.note=ci-password-42", "--set", "train.seed=3",
            "--password", "hunter2", "--token=xyz", "ci-password-42"]
    assert redact.redact_argv(argv) == [
        "python", "-m", "tasn.cli", "train", "--data", "s3://b/prepared", "-S", "train.lr=0.05",
        "-S", "tracking.uri=https://***@mlflow:5000", "-S", "extra.api_key=***",
        "--set=db.password=***", "-Sx.note=***", "--set", "train.seed=3",
        "--password", "***", "--token=***", "***"]


def test_the_component_runtime_prints_its_argv_redacted(capfd, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    secret = "tok-in-argv-7788"
    # `tasn --version` exits before the rest is parsed: the argv is what matters here
    run_tasn(["--version", "--data", f"https://ci:{secret}@mlflow:5000/raw", "-S", "x.secret=plain"])
    out = capfd.readouterr().out
    assert out.startswith("+ ") and "--data https://***@mlflow:5000/raw" in out and "x.secret=***" in out
    assert secret not in out and "plain" not in out


def test_cli_error_lines_and_logs_are_redacted(capfd, caplog, no_credentials):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the block ends
    secret = "never-print-me-5150"
    with caplog.at_level(logging.INFO):
        code = main(["promote", "--version", "1", "-S", f"tracking.uri=http://ci:{secret}@127.0.0.1:{port}"])
        logging.getLogger("tasn.test").info("reached https://ci:%s@h and %s", secret, secret)
    err = capfd.readouterr().err
    assert code == 1 and f"http://127.0.0.1:{port} is not reachable" in err and "Traceback" not in err
    assert secret not in err and secret not in caplog.text and "reached https://***@h and ***" in caplog.text


def test_log_records_are_redacted_on_handlers_that_do_not_propagate(monkeypatch):
    """MLflow's loggers have their own handler and do not propagate: the record factory covers them."""
    monkeypatch.setenv("SERVICE_PASSWORD", "pw-on-every-handler")
    redact.install_log_redaction()
    stream = io.StringIO()
    logger = logging.getLogger("tasn.test.isolated")
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    try:
        raise RuntimeError("connect to postgresql://u:pw-on-every-handler@db failed")
    except RuntimeError:
        logger.exception("store %s", "https://u:pw-on-every-handler@db")
    text = stream.getvalue()
    assert "pw-on-every-handler" not in text and "store https://***@db" in text
    assert "RuntimeError: connect to postgresql://***@db failed" in text


def test_a_run_json_uri_takes_its_credentials_from_the_environments_uri(monkeypatch):
    """run.json records `http://host` (no userinfo); a later stage whose MLFLOW_TRACKING_URI names
    the same server with credentials uses that one, and any other server's URI is not given them."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ci:pw@mlflow:5000")
    assert tracking.resolve_uri(TrackingConfig(), "http://mlflow:5000") == "http://ci:pw@mlflow:5000"
    assert tracking.resolve_uri(TrackingConfig(), "http://other:5000") == "http://other:5000"
    assert tracking.resolve_uri(TrackingConfig(uri="http://x:5000"), "http://mlflow:5000") == "http://x:5000"


# -- copy_tree containment and its S3 branch ----------------------------------------------------

def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_copy_tree_refuses_a_local_source_that_lands_outside_through_a_symlink(tmp_path):
    src, dest, outside = tmp_path / "src", tmp_path / "dest", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.txt").write_bytes(b"b")
    outside.mkdir()
    dest.mkdir()
    (dest / "sub").symlink_to(outside)  # left in the destination by someone else
    with pytest.raises(DataError, match=r"key path 'sub/b.txt' leads out of .* through a symbolic link \(to .*outside"
                                        r".*nothing was copied"):
        storage.copy_tree(str(src), str(dest))
    assert _files(outside) == {} and not (dest / "a.txt").exists()  # checked before the first write
    (dest / "sub").unlink()
    assert storage.copy_tree(str(src), str(dest)) == 2 and _files(dest) == {"a.txt": b"a", "sub/b.txt": b"b"}


@pytest.mark.integration
@pytest.mark.parametrize("key,why", [("data/../escape.txt", r"part '\.\.' is '\.' or '\.\.'"),
                                     ("data/sub/../../../escape.txt", r"part '\.\.' is '\.' or '\.\.'"),
                                     ("data//etc/escape.txt", "is absolute")])
def test_copy_tree_refuses_hostile_object_keys(s3_server, tmp_path, monkeypatch, key, why):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="data/fine.txt", Body=b"fine")
    client.put_object(Bucket=bucket, Key=key, Body=b"planted")
    assert key in [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]  # stored as given
    box = tmp_path / "box"
    dest = box / "a" / "b" / "dest"
    with pytest.raises(DataError, match=f"key .*{why}.*, outside the destination"):
        storage.copy_tree(f"s3://{bucket}/data", str(dest))
    assert _files(tmp_path) == {} and not Path("/etc/escape.txt").exists()
    with pytest.raises(DataError, match=why):  # nor does an upload carry the key to another prefix
        storage.copy_tree(f"s3://{bucket}/data", f"s3://{bucket}/copy")
    assert not [o for o in client.list_objects_v2(Bucket=bucket)["Contents"] if o["Key"].startswith("copy")]


@pytest.mark.integration
def test_the_launcher_moves_data_and_models_through_rgw(s3_server, tmp_path, monkeypatch):
    """Node data download and node 0's upload (`tasn.launch.node_main`, the trainer itself faked),
    then the launcher's model fetch, all through copy_tree's S3 branch on Ceph RGW."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    prepared = {"manifest.parquet": b"m" * 10, "shards/shard-00000.bin": os.urandom(70_000), "classes.json": b"[]"}
    for rel, body in prepared.items():
        client.put_object(Bucket=bucket, Key=f"prepared/{rel}", Body=body)
    client.put_object(Bucket=bucket, Key="prepared/shards/", Body=b"")  # a console's folder marker
    seen = {}

    def trainer(argv):
        seen["data"] = _files(Path(argv[argv.index("--data") + 1]))
        out = Path(argv[argv.index("--out") + 1])
        (out / "pictures").mkdir(parents=True)
        (out / "model.pt").write_bytes(b"weights" * 1000)
        (out / "pictures" / "attention_epoch_001.png").write_bytes(b"\x89PNG")
        return 0

    monkeypatch.setattr("tasn.launch.subprocess.call", trainer)
    monkeypatch.setenv("PET_NODE_RANK", "0")
    monkeypatch.setenv(PARAMS_ENV, "train: {epochs: 1}\n")
    work = f"s3://{bucket}/runs/r1"
    assert node_main(["--data-uri", f"s3://{bucket}/prepared", "--work-uri", work]) == 0
    assert seen["data"] == prepared
    uploaded = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"])
    assert uploaded == [f"runs/r1/{WORK_OUT}/model.pt", f"runs/r1/{WORK_OUT}/pictures/attention_epoch_001.png"]
    fetched = tmp_path / "model"
    assert storage.copy_tree(storage.join(work, WORK_OUT), str(fetched)) == 2  # what run_trainjob does
    assert _files(fetched) == {"model.pt": b"weights" * 1000, "pictures/attention_epoch_001.png": b"\x89PNG"}


# -- MLflow with authentication, on PostgreSQL ------------------------------------------------------

def _create_user(server, account: Account) -> None:
    resp = requests.post(f"{server.url}/api/2.0/mlflow/users/create", timeout=60,
                         json={"username": account.username, "password": account.password},
                         auth=(server.admin.username, server.admin.password))
    assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def accounts(mlflow_auth_server):
    """The pipeline's account (Secret tasn-mlflow-credentials) and one with only the default READ."""
    ci = Account("tasn-pipeline", "ci-pw-3f9a1c77e2")
    intruder = Account("intruder", "intruder-pw-81d0b5")
    for account in (ci, intruder):
        _create_user(mlflow_auth_server, account)
    return ci, intruder


def _as(monkeypatch, account: Account | None) -> None:
    for name, value in (account.env() if account else {}).items():
        monkeypatch.setenv(name, value)
    if account is None:
        for name in (tracking.USER_ENV, tracking.PASSWORD_ENV):
            monkeypatch.delenv(name, raising=False)


@pytest.mark.integration
def test_connection_check_names_the_server_and_the_variables(mlflow_auth_server, accounts, no_credentials,
                                                             monkeypatch):
    url = mlflow_auth_server.url
    variables = f"{tracking.USER_ENV} and {tracking.PASSWORD_ENV}"
    with pytest.raises(ServiceError, match=rf"{url} needs a user, and none was given \(401.*{variables}"):
        tracking.check_reachable(url)
    _as(monkeypatch, Account(accounts[0].username, "wrong-password"))
    with pytest.raises(ServiceError, match=rf"{url} did not accept user 'tasn-pipeline' \(401"):
        tracking.check_reachable(url)
    _as(monkeypatch, accounts[0])
    tracking.check_reachable(url)


@pytest.mark.integration
def test_pipeline_account_trains_registers_promotes_intruder_cannot_and_nothing_leaks(
        mlflow_auth_server, accounts, smoke_data, tmp_path, no_credentials, monkeypatch, capfd, caplog):  # noqa: F811
    server, (ci, intruder) = mlflow_auth_server, accounts
    url = server.url
    host = url.removeprefix("http://")
    name = "tasn-auth"
    admin = MlflowClient(url, registry_uri=url)
    out, scored, reg = tmp_path / "train", tmp_path / "evaluate", tmp_path / "register"
    smoke = ["--params", str(ROOT / "params.yaml"), "--profile", "smoke"]
    code_of = {}
    with caplog.at_level(logging.INFO):
        # 1. training, as the pipeline's account given in the tracking URI
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            code_of["train"] = main(["train", "--data", str(smoke_data), "--out", str(out), *smoke,
                                     "-S", "train.max_steps=2", "-S", "tracking.system_metrics=false",
                                     "-S", "tracking.experiment=tasn-auth", "-S", "train.picture_images=1",
                                     "-S", f"tracking.uri=http://{ci.username}:{ci.password}@{host}"])
        finally:
            torch.set_num_threads(threads)
        # 2. evaluating, registering and gating, as the pipeline's account given in the environment (as
        # the pods); the gate reads the test split's accuracies, which are evaluate's
        _as(monkeypatch, ci)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        torch.set_num_threads(1)
        try:
            code_of["evaluate"] = main(["evaluate", "--data", str(smoke_data), "--model", str(out / MODEL),
                                        "--out", str(scored), "--run-json", str(out / RUN), *smoke])
        finally:
            torch.set_num_threads(threads)
        register = ["register", "--run-json", str(out / RUN), "--metrics", str(scored / evaluate.METRICS),
                    "--name", name, *smoke]
        code_of["register"] = main([*register, "--out", str(reg), "--promote"])
        code_of["register v2"] = main([*register, "--out", str(tmp_path / "reg2")])
        capfd.readouterr()
        # 3. the intruder: READ everywhere by default, nothing more
        _as(monkeypatch, intruder)
        code_of["intruder register"] = main([*register, "--out", str(tmp_path / "reg3")])
        refused_register = capfd.readouterr().err
        code_of["intruder promote"] = main(["promote", "--name", name, "--version", "2", "--force", "--reason",
                                            "mine now", *smoke])
        refused_promote = capfd.readouterr().err
        with pytest.raises(MlflowException) as by_hand:
            MlflowClient(url, registry_uri=url).set_registered_model_alias(name, "staging", "2")
        # 4. the pipeline's account still can, and the intruder left no lock behind
        _as(monkeypatch, ci)
        code_of["promote v2"] = main(["promote", "--name", name, "--version", "2", "--force", "--reason",
                                      "canary passed", *smoke])
    captured = capfd.readouterr()

    assert code_of == {"train": 0, "evaluate": 0, "register": 0, "register v2": 0, "intruder register": 1,
                       "intruder promote": 1, "promote v2": 0}
    registration = json.loads((reg / REGISTRATION).read_text())
    assert (registration["version"], registration["decision"], registration["applied"]) == ("1", "promote", True)
    for err, endpoint in ((refused_register, "model-versions/create"), (refused_promote, "registered-models/")):
        assert f"MLflow tracking server {url} refused /api/2.0/mlflow/{endpoint}" in err, err
        assert "to user 'intruder' (403 Permission denied)" in err and tracking.USER_ENV in err
        assert "Traceback" not in err
    assert by_hand.value.error_code == "PERMISSION_DENIED"
    _as(monkeypatch, server.admin)
    versions = admin.search_model_versions(f"name='{name}'")
    assert sorted(v.version for v in versions) == ["1", "2"]  # the intruder's registration made none
    assert str(alias_holder(admin, name, "staging").version) == "2"
    promotions = {k: json.loads(v) for k, v in admin.get_model_version(name, "2").tags.items()
                  if k.startswith("promotion.")}
    assert [("canary passed" in p["why"], p["forced"]) for p in promotions.values()] == [(True, True)]  # not "mine now"
    assert lock.claims(admin, name) == {}

    # the run: tracked, with the server's URI (no userinfo) in its params and in run.json
    run_info = json.loads((out / RUN).read_text())
    assert run_info["tracking_uri"] == url
    run = admin.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED" and "tracking.uri" not in run.data.params  # a setting of no weight
    assert run.data.params["train.max_steps"] == "2" and "master_aux_top1" in run.data.metrics

    # no credential anywhere: params, tags, artifacts, output files, stdout/stderr, logs, the server
    secrets = [ci.password, intruder.password, server.admin.password, server.postgres.password]
    texts = {"stdout": captured.out, "stderr": captured.err, "logs": caplog.text,
             "server log": server.log.read_text(), "server argv": Path(f"/proc/{server.proc.pid}/cmdline").read_text(),
             "params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags)}
    model = admin.get_registered_model(name)
    texts["model"] = json.dumps([model.tags, model.description] + [[v.tags, v.description, v.source]
                                                                   for v in versions])
    blobs = {str(p): p.read_bytes() for d in (out, scored, reg) for p in d.rglob("*") if p.is_file()}
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "art"),
                                                         tracking_uri=url))
    logged = Path(mlflow.artifacts.download_artifacts(artifact_uri=run_info["model_uri"],
                                                      dst_path=str(tmp_path / "logged"), tracking_uri=url))
    blobs |= {str(p): p.read_bytes() for d in (artifacts, logged) for p in d.rglob("*") if p.is_file()}
    assert any(p.endswith("model.pt") for p in blobs) and any(p.endswith("MLmodel") for p in blobs)
    for secret in secrets:
        assert [k for k, text in texts.items() if secret in text] == [], secret
        assert [k for k, blob in blobs.items() if secret.encode() in blob] == [], secret


@pytest.mark.integration
def test_an_account_that_may_only_read_cannot_block_promotions(mlflow_auth_server, accounts, no_credentials,
                                                               monkeypatch, capfd, caplog):
    """The intruder (default READ) creates the lock model older tasn versions obeyed, with a forged
    owner, and tries to claim the lock on the model itself: the claim is refused (403); the
    pipeline's promotion goes through at once, the forged model ignored with a warning (old tasn
    waited a lease, could not delete it and blamed the forged owner); the intruder's own promotion
    is refused at its claim."""
    server, (ci, intruder) = mlflow_auth_server, accounts
    url, name = server.url, "tasn-lock"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    _as(monkeypatch, ci)  # a version of the pipeline's, tagged as `tasn register` tags it (its model matters not)
    pipeline = MlflowClient(url, registry_uri=url)
    run = pipeline.create_run(pipeline.create_experiment(f"lock-{uuid.uuid4().hex[:8]}"))
    pipeline.create_registered_model(name)
    pipeline.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                  tags={"metric.master_aux_top1": "0.5", "data_version": "d1"})

    _as(monkeypatch, intruder)
    forger = MlflowClient(url, registry_uri=url)
    forger.create_registered_model(name + lock.LEGACY_LOCK_SUFFIX,
                                   tags={"owner": "tasn-pipeline@ci-node", "token": "forged", "beat": "0"})
    with pytest.raises(MlflowException) as claim:
        forger.set_registered_model_tag(name, lock.CLAIM_TAG + "forged",
                                        json.dumps({"owner": "tasn-pipeline@ci-node", "number": 0, "beat": 0}))
    assert claim.value.error_code == "PERMISSION_DENIED"

    _as(monkeypatch, ci)  # the pipeline, with the forged lock in place: not obeyed, not waited on
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        assert main(["promote", "--name", name, "--version", "1"]) == 0
    out = capfd.readouterr()
    assert "tasn-lock v1 -> staging: promoted" in out.out, out
    assert f"ignoring the registered model '{name}{lock.LEGACY_LOCK_SUFFIX}'" in caplog.text
    assert "was not renewed" not in caplog.text and "tasn-pipeline@ci-node" not in caplog.text

    _as(monkeypatch, intruder)  # and the intruder's own promotion is refused at its claim
    assert main(["promote", "--name", name, "--version", "1", "--force", "--reason", "mine"]) == 1
    refused = capfd.readouterr().err
    assert f"{url} refused /api/2.0/mlflow/registered-models/set-tag to user 'intruder'" in refused, refused
    assert "tasn-pipeline@ci-node" not in refused and "Traceback" not in refused
    _as(monkeypatch, server.admin)
    admin = MlflowClient(url, registry_uri=url)
    assert str(alias_holder(admin, name, "staging").version) == "1" and lock.claims(admin, name) == {}


def test_credentials_in_config_uris_never_reach_model_files_or_checkpoints(tmp_path):
    secrets = ["tok-in-uri-4711", "s3-secret-0815"]
    cfg = load_config(ROOT / "params.yaml", None, [
        "model.kind=baseline", "model.out_size=32", "model.input_size=32", "preprocess.size=40",
        f"tracking.uri=https://ci:{secrets[0]}@mlflow:5000", f"tracking.s3_endpoint=http://key:{secrets[1]}@rgw:7480"])
    net = build_model(cfg.model, 3)
    save_model(str(tmp_path / "model.pt"), net, cfg.to_dict(), ["a", "b", "c"])
    state = {"model": net.state_dict(), "optimizer": {}, "epoch": 0, "step": 1, "config": cfg.to_dict(),
             "fingerprint": fingerprint(cfg, "d1")}
    save_checkpoint(state, str(tmp_path / "checkpoints"), 1)
    files = [tmp_path / "model.pt", *(tmp_path / "checkpoints").iterdir()]
    assert len(files) == 2 and not [(f.name, s) for f in files for s in secrets if s.encode() in f.read_bytes()]
    predictor = from_checkpoint(str(tmp_path / "model.pt"))  # and the file still loads, its URIs readable
    assert predictor.config["tracking"]["uri"] == "https://***@mlflow:5000"


# -- what a model server and `tasn predict` decode, and what they tell a client ----------------------

def _png_claiming(width: int, height: int) -> bytes:
    """The first bytes of a PNG whose header claims `width` x `height` pixels (no pixel data: a
    decoder that believes the header would try to allocate them all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return baseline_model(tmp_path_factory.mktemp("served"))[2]


def test_predict_and_serving_decode_nothing_past_the_models_pixel_limit(predictor, tmp_path, capsys):
    bomb = _png_claiming(13_000, 13_000)  # 169 Mpx; the model's preprocess.max_pixels is 90 Mpx
    frame = pd.DataFrame({serving.IMAGE: [bomb]})
    with pytest.raises(DataError, match=r"row 0: column 'image': 13000x13000 px = 169.0 Mpx, more than the limit of "
                                        r"90 Mpx \(the model's preprocess.max_pixels\)"):
        serving.predict_frame(predictor, frame)
    (tmp_path / "bomb.png").write_bytes(bomb)
    assert main(["predict", str(tmp_path / "bomb.png"), "--model", str(tmp_path / "missing.pt")]) == 1
    err = capsys.readouterr().err
    assert "bomb.png: 13000x13000 px = 169.0 Mpx, more than the limit of 90 Mpx" in err and "Traceback" not in err


def test_a_served_model_reads_paths_only_under_its_image_folder_and_says_nothing_of_other_files(
        predictor, tmp_path, monkeypatch):
    served, secret = tmp_path / "served", tmp_path / "secret"
    served.mkdir()
    secret.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(secret / "private.png")
    Image.new("RGB", (40, 40), (10, 10, 200)).save(served / "bird.png")
    (served / "link.png").symlink_to(secret / "private.png")

    def refusal(path: str) -> str:
        with pytest.raises(DataError) as exc:
            serving.predict_frame(predictor, pd.DataFrame({serving.PATH: [path]}))
        return str(exc.value)

    assert "column 'path' is not served here" in refusal(str(secret / "private.png"))  # no folder configured
    monkeypatch.setenv(serving.IMAGE_ROOT_ENV, str(served))
    assert serving.predict_frame(predictor, pd.DataFrame({serving.PATH: ["bird.png"]}))["prob"][0] > 0
    paths = (str(secret / "private.png"), str(secret / "missing.png"), "../secret/private.png", "../secret/missing.png",
             "link.png", "missing.png")
    answers = {p: refusal(p) for p in paths}
    generic = {text.replace(repr(p), "PATH") for p, text in answers.items()}
    assert generic == {"row 0: PATH is not an image file under the server's image folder"}, answers


def test_a_bad_request_to_the_pyfunc_is_a_message_not_a_stack_trace(predictor):
    model = TASNClassifier()
    model.predictor = predictor
    with pytest.raises(MlflowException) as bad:
        model.predict(None, pd.DataFrame({serving.IMAGE: [b"not an image"]}))
    answer = json.loads(bad.value.serialize_as_json())
    assert bad.value.get_http_status_code() == 400 and "stack_trace" not in answer
    assert answer["message"] == "row 0: column 'image': not an image (no decoder recognises its contents)"
