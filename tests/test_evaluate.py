"""`tasn evaluate` on the tiny prepared smoke dataset, checked against an independent computation
(the network run image by image, accuracies and KL computed with numpy)."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from fixtures.models import log_baseline
from tasn.checkpoint import load_model, save_model
from tasn.cli import main
from tasn.data.dataset import PreparedDataset
from tasn.data.preprocess import CLASSES, MANIFEST
from tasn.data.transforms import eval_transform
from tasn.errors import DataError
from tasn.evaluate import CONFUSION_CSV, CONFUSION_PNG, METRICS, PER_CLASS, RUN_ARTIFACTS, compute_metrics, evaluate
from tasn.model import build_model
from tasn.training.outputs import MODEL, RUN


def cfg_for(*overrides):
    return smoke_config("evaluate.topk=2", "evaluate.timing_batches=1", *overrides)


def save(tmp_path, kind: str, classes, name=MODEL, seed=0) -> Path:
    cfg = cfg_for(f"model.kind={kind}")
    torch.manual_seed(seed)
    path = tmp_path / name
    save_model(str(path), build_model(cfg.model, len(classes)), cfg.to_dict(), classes)
    return path


def classes_of(data: Path) -> list[str]:
    return json.loads((data / CLASSES).read_text())


def reference(model_path: Path, data: Path):
    """Each test image alone through the network: {head: (n, c) numpy logits}, labels."""
    net, meta = load_model(str(model_path))
    ds = PreparedDataset(data, "test", eval_transform(meta["config"]["model"]["input_size"]))
    heads: dict[str, list[np.ndarray]] = {h: [] for h in net.heads}
    with torch.no_grad():
        for i in range(len(ds)):
            x, _ = ds[i]
            out = net(x[None])
            for h in net.heads:
                heads[h].append(getattr(out, h)[0].numpy())
    return {h: np.stack(v) for h, v in heads.items()}, np.array(ds.labels)


def np_topk(logits, labels, k):
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean([labels[i] in top[i] for i in range(len(labels))]))


def np_kl(p_logits, q_logits, t):
    def log_softmax(z):
        z = z / t
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float(np.mean((np.exp(lp) * (lp - lq)).sum(axis=1)))


def test_top_k_metrics_on_enough_classes_that_top_5_can_miss():
    """12 classes and logits where each head ranks the truth differently, so that top-1, top-3 and
    top-5 differ from each other and from 1.0, and a head swapped for another shows."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 200)
    heads = {}
    for h, (lo, hi) in {"part": (0.5, 3.0), "master": (1.0, 2.0), "master_aux": (0.0, 1.5)}.items():
        logits = rng.normal(size=(200, 12))
        logits[np.arange(200), labels] += rng.uniform(lo, hi, 200)  # the truth ranked high, not always first
        heads[h] = torch.from_numpy(logits).float()
    m = compute_metrics(heads, torch.from_numpy(labels), "master_aux", 3, 10.0)
    for h, logits in heads.items():
        assert m[f"{h}_top1"] == pytest.approx(np_topk(logits.numpy(), labels, 1)), h
    assert m["master_aux_top3"] == pytest.approx(np_topk(heads["master_aux"].numpy(), labels, 3))
    assert not {"part_top3", "master_top3"} & set(m)  # top-k of the prediction head only
    want = {h: np_topk(v.numpy(), labels, 5) for h, v in heads.items()}
    assert m["top5"] == pytest.approx(want["master_aux"]) and m["top1"] == m["master_aux_top1"]
    assert m["top1"] < m["master_aux_top3"] < m["top5"] < 1.0
    assert len({round(v, 3) for v in want.values()}) == 3  # another head's top-5 would not match


@pytest.fixture(scope="module")
def tasn_eval(smoke_data, tmp_path_factory):  # noqa: F811

    tmp = tmp_path_factory.mktemp("eval-tasn")
    model = save(tmp, "tasn", classes_of(smoke_data))
    metrics = evaluate(cfg_for(), smoke_data, str(model), tmp / "out").metrics
    return tmp / "out", metrics, reference(model, smoke_data)


def test_tasn_metrics_match_an_independent_computation(tasn_eval):
    out, metrics, (heads, labels) = tasn_eval
    assert set(heads) == {"attention", "part", "master", "part_aux", "master_aux"}
    for h, logits in heads.items():
        assert metrics[f"{h}_top1"] == pytest.approx(np_topk(logits, labels, 1)), h
    assert metrics["master_aux_top2"] == pytest.approx(np_topk(heads["master_aux"], labels, 2))
    assert metrics["top1"] == metrics["master_aux_top1"]
    assert metrics["top5"] == pytest.approx(np_topk(heads["master_aux"], labels, 5))
    agree = float(np.mean(heads["part"].argmax(1) == heads["master"].argmax(1)))
    assert metrics["distill_agreement"] == pytest.approx(agree)
    assert metrics["distill_kl_t1"] == pytest.approx(np_kl(heads["part"], heads["master"], 1.0), rel=1e-3, abs=1e-6)
    assert metrics["distill_kl_t"] == pytest.approx(np_kl(heads["part"], heads["master"], 10.0), rel=1e-3, abs=1e-7)
    assert metrics["num_test"] == len(labels) == 12
    assert not {"num_classes", "timing_batch_size", "distill_temperature"} & set(metrics)  # settings, no metrics
    assert metrics["throughput_ips"] > 0 and 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p90"]
    on_disk = json.loads((out / METRICS).read_text())
    assert on_disk == pytest.approx(metrics)
    assert all(isinstance(v, (int, float)) for v in on_disk.values())  # flat numbers for DVC


def test_tables_and_picture(tasn_eval, smoke_data):  # noqa: F811
    out, _, (heads, labels) = tasn_eval
    names = classes_of(smoke_data)
    pred = heads["master_aux"].argmax(1)
    rows = list(csv.DictReader((out / PER_CLASS).open()))
    assert [r["class_name"] for r in rows] == names
    for i, r in enumerate(rows):
        mine = labels == i
        assert int(r["support"]) == mine.sum() and int(r["correct"]) == (pred[mine] == i).sum()
        assert float(r["accuracy"]) == pytest.approx((pred[mine] == i).mean(), abs=1e-6)
    pairs = Counter((r["actual"], r["predicted"]) for r in csv.DictReader((out / CONFUSION_CSV).open()))
    assert pairs == Counter((names[a], names[p]) for a, p in zip(labels, pred))
    png = (out / CONFUSION_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_baseline_has_one_head_and_the_same_top1_key(smoke_data, tmp_path):  # noqa: F811

    model = save(tmp_path, "baseline", classes_of(smoke_data))
    metrics = evaluate(cfg_for(), smoke_data, str(model), tmp_path / "out").metrics
    heads, labels = reference(model, smoke_data)
    assert set(heads) == {"logits"}
    assert metrics["top1"] == metrics["logits_top1"] == pytest.approx(np_topk(heads["logits"], labels, 1))
    assert not any(k.startswith(("master", "distill")) for k in metrics)


def test_bad_inputs_fail_clearly_and_keep_old_outputs(smoke_data, tmp_path, capsys):  # noqa: F811

    out = tmp_path / "out"
    out.mkdir()
    (out / METRICS).write_text('{"top1": 0.5}')
    cfg = cfg_for()
    with pytest.raises(DataError, match="nope.pt: no such checkpoint"):
        evaluate(cfg, smoke_data, str(tmp_path / "nope.pt"), out)
    other = save(tmp_path, "baseline", ["a", "b", "c", "d"], name="other.pt")
    with pytest.raises(DataError, match="class mismatch"):
        evaluate(cfg, smoke_data, str(other), out)
    train_only = tmp_path / "train_only"
    shutil.copytree(smoke_data, train_only)
    manifest = pd.read_parquet(train_only / MANIFEST)
    manifest[manifest["split"] == "train"].to_parquet(train_only / MANIFEST)
    model = save(tmp_path, "baseline", classes_of(smoke_data))
    with pytest.raises(DataError, match="test split is empty"):
        evaluate(cfg, train_only, str(model), out)
    assert main(["evaluate", "--profile", "smoke", "--data", str(smoke_data), "--model", str(tmp_path / "x.pt"),
                 "--out", str(out)]) == 1
    assert "x.pt: no such checkpoint" in capsys.readouterr().err
    assert (out / METRICS).read_text() == '{"top1": 0.5}'  # nothing produced was destroyed


@pytest.mark.integration
def test_cli_logs_to_the_training_run(smoke_data, tmp_path, mlflow_server, monkeypatch, capsys):  # noqa: F811

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    with mlflow.start_run() as run:
        pass
    run_json = tmp_path / RUN
    run_json.write_text(json.dumps({"run_id": run.info.run_id}))
    model = save(tmp_path, "baseline", classes_of(smoke_data))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["evaluate", "--profile", "smoke", "-S", "evaluate.timing_batches=1", "--data", str(smoke_data),
                 "--model", str(model), "--out", str(out), "--run-json", str(run_json)]) == 0
    metrics = json.loads((out / METRICS).read_text())
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics)
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert logged.data.metrics["test_top1"] == pytest.approx(metrics["top1"])
    assert logged.data.metrics["test_logits_top5"] == pytest.approx(metrics["logits_top5"])
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluate")}
    assert {f"{RUN_ARTIFACTS}/{name}" for name in (METRICS, PER_CLASS, CONFUSION_CSV, CONFUSION_PNG)} <= files


@pytest.mark.integration
def test_an_mlflow_model_is_scored_into_its_run_and_its_logged_model(smoke_data, tmp_path, mlflow_server,  # noqa: F811
                                                                     monkeypatch):
    """`--model models:/<model_id>`: the weights are read (no unpickling), the numbers match the
    network run image by image, and they land on the run that logged the model and on the model."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(mlflow_server.url)
    with mlflow.start_run() as run:
        info, _ = log_baseline(tmp_path / "model", classes_of(smoke_data), input_size=64, resize=96)
    result = evaluate(cfg_for(), smoke_data, info.model_uri, tmp_path / "out")
    assert result.run_id == run.info.run_id
    heads, labels = reference(tmp_path / "model" / MODEL, smoke_data)
    assert result.metrics["top1"] == pytest.approx(np_topk(heads["logits"], labels, 1))
    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).data.metrics["test_top1"] == pytest.approx(result.metrics["top1"])
    on_model = {m.key: m.value for m in client.get_logged_model(info.model_id).metrics}
    assert on_model["test_top1"] == pytest.approx(result.metrics["top1"])
    assert on_model["test_logits_top2"] == pytest.approx(result.metrics["logits_top2"])
