"""Every stage from the library alone, no CLI: synth -> validate -> preprocess -> train -> evaluate
-> register (with the staging gate) -> promote to production, on the smoke profile, tracked in a
sqlite MLflow store in a temporary folder; and the same training untracked, without pictures, to
the same bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tasn import evaluate as evaluation
from tasn import registry
from tasn.config import load_config
from tasn.data import preprocess as preparation
from tasn.data import validate as validation
from tasn.data.synth import generate
from tasn.io import MODEL_SHA256
from tasn.registry.versions import alias_holder
from tasn.training import outputs, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_each_stage_runs_from_the_library(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = ["validate.min_side=32", "validate.workers=1", "preprocess.workers=1", "train.epochs=2"]
    cfg = load_config(ROOT / "params.yaml", "smoke", [
        *settings, f"tracking.uri={uri}", "tracking.system_metrics=false", "register.model_name=tasn-library",
    ])
    generate(tmp_path / "raw", cfg.data.synth, workers=1)

    checked = validation.validate(tmp_path / "raw", tmp_path / "validated", cfg.validate)
    assert checked.summary["passed"] and checked.summary["classes"] == cfg.data.synth.classes
    assert json.loads((tmp_path / "validated" / validation.SUMMARY).read_text()) == checked.summary

    prepared = preparation.preprocess(tmp_path / "raw", tmp_path / "prepared", cfg.preprocess)
    assert prepared.summary["images"] == checked.summary["images"] and prepared.out_dir == tmp_path / "prepared"

    untracked = load_config(ROOT / "params.yaml", "smoke", [*settings, "tracking.enabled=false",
                                                            "train.picture_images=0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train(cfg, prepared.out_dir, tmp_path / "train")
        plain = train(untracked, prepared.out_dir, tmp_path / "plain")
    finally:
        torch.set_num_threads(threads)
    # the same seed, the same result on one machine and thread count: what `make run` adds to a
    # plain `tasn train` (MLflow tracking, the attention pictures drawn after epoch 1) changes no bit
    tracked_weights, plain_weights = (torch.load(d / outputs.MODEL, weights_only=True)["model"]
                                      for d in (tmp_path / "train", tmp_path / "plain"))
    assert all(torch.equal(tracked_weights[k], plain_weights[k]) for k in plain_weights)
    assert (tmp_path / "train" / outputs.HISTORY).read_text() == (tmp_path / "plain" / outputs.HISTORY).read_text()
    assert not plain.run.run_id and (tmp_path / "train" / outputs.PICTURES).is_dir()
    assert trained.run.run_id and trained.run.tracking_uri == uri and trained.run.model_uri
    recorded = json.loads((tmp_path / "train" / outputs.RUN).read_text())
    assert recorded.pop(MODEL_SHA256) == trained.metrics[MODEL_SHA256] and recorded == trained.run.to_dict()
    assert json.loads((tmp_path / "train" / outputs.METRICS).read_text()) == trained.metrics
    assert trained.metrics["epochs"] == 2 and (tmp_path / "train" / outputs.MODEL).is_file()

    scored = evaluation.evaluate(cfg, prepared.out_dir, str(tmp_path / "train" / outputs.MODEL),
                                 tmp_path / "evaluate", run_id=trained.run.run_id)
    assert scored.run_id == trained.run.run_id and 0 <= scored.metrics["top1"] <= 1
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_run(trained.run.run_id).data.metrics["test_top1"] == pytest.approx(scored.metrics["top1"])

    registered = registry.register(cfg, tmp_path / "train" / outputs.RUN, tmp_path / "evaluate" / evaluation.METRICS,
                                   tmp_path / "register", promote=True)
    assert registered.decision is not None and registered.decision.applied  # the first version: promoted
    record = json.loads((tmp_path / "register" / registry.REGISTRATION).read_text())
    assert record == json.loads(json.dumps(registered.registration))
    assert (record["name"], record["version"], record["decision"]) == ("tasn-library", "1", "promote")
    assert record["candidate"] == pytest.approx(scored.metrics["master_aux_top1"])

    decision_file = tmp_path / "production.json"
    moved = registry.promote(cfg, None, to="production", reason="library test", decision_file=decision_file)
    assert moved.applied and moved.version == "1" and json.loads(decision_file.read_text())["promote"] is True
    assert str(alias_holder(client, "tasn-library", "production").version) == "1"
    assert [r["alias"] for r in registry.promotion_history(cfg)["promotions"]] == ["staging", "production"]
