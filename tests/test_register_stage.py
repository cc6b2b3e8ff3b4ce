"""`tasn register`: what the registry says in words (descriptions of the model and its versions,
kept current by promotions), which runs register (register.enabled: a DVC experiment only when
asked), and who may move `@staging` (never a DVC experiment, never with register.promote false).
On a sqlite MLflow store in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from fixtures.models import log_baseline
from tasn import registry, tracking
from tasn.config import load_config
from tasn.registry import describe
from tasn.training.outputs import RUN

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"master_aux_top1": 0.625, "top1": 0.625, "top5": 1.0, "num_test": 12.0}


def test_a_version_description_says_what_data_metric_and_context():
    text = describe.version_description(
        params={"model.kind": "tasn", "model.backbone": "resnet50", "model.out_size": "224"},
        run_name="tasn-resnet50-out224-3f9a1c", run_id="abc123", data_version="8753.dir", metrics=METRICS,
        primary_metric="master_aux_top1", commit="c0ffee", context={tracking.KFP_RUN_TAG: "run-7"})
    assert text.splitlines()[0] == ("**tasn** `resnet50`, out size 224 px, trained by run "
                                    "`tasn-resnet50-out224-3f9a1c` (`abc123`).")
    assert "Data version `8753.dir`: test master_aux_top1 **0.6250** (top-1 0.6250, top-5 1.0000, 12 test" in text
    assert "From commit `c0ffee`, Kubeflow run `run-7`." in text and "DVC" not in text
    assert text.endswith(describe.PROMOTIONS)
    record = {"when": "2026-11-30T10:00:00+00:00", "alias": "staging", "seq": 3, "forced": False,
              "who": "ana@laptop", "why": "better: 0.7 > 0.6", "version": "4"}
    promoted = describe.with_line(text, describe.promotion_line(record))
    assert promoted.endswith(f"{describe.PROMOTIONS}\n- 2026-11-30T10:00:00+00:00: took `@staging` (promotion #3, "
                             "by the gate, by ana@laptop): better: 0.7 > 0.6")
    assert describe.with_line("written by hand", "- x") == f"written by hand\n\n{describe.PROMOTIONS}\n- x"
    assert "moved on to version 4 (promotion #3)" in describe.displaced_line(record)


def test_the_model_description_names_the_alias_holders():
    assert "Now: no alias is set yet." in describe.model_description("tasn", {})
    text = describe.model_description("tasn", {"staging": ("3", "d1"), "production": ("2", "d1")})
    assert "models:/tasn@staging" in text
    assert "Now: `@production` = version 2 (data version `d1`); `@staging` = version 3 (data version `d1`)." in text


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite store, and a run.json / metrics.json of a real logged model in it."""
    monkeypatch.chdir(tmp_path)  # the store keeps its artifacts in ./mlruns
    monkeypatch.delenv(tracking.DVC_EXP_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_name="tasn-resnet18-slim-out32-abcdef") as run:
        mlflow.set_tags({"data.version": "d1", tracking.KFP_RUN_TAG: "kfp-9"})
        mlflow.log_params({"model.kind": "baseline", "model.backbone": "resnet18-slim", "model.out_size": 32})
        info, _ = log_baseline(tmp_path / "model")
    (tmp_path / RUN).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri,
                                            "model_uri": info.model_uri}))
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    return tmp_path, uri


def register(tmp_path, uri, *overrides, promote=True):
    cfg = load_config(ROOT / "params.yaml", None, [f"tracking.uri={uri}", *overrides])
    return registry.register(cfg, tmp_path / RUN, tmp_path / "metrics.json", tmp_path / "out", promote=promote)


@pytest.mark.slow
def test_register_describes_and_promotion_updates_the_descriptions(store):
    tmp_path, uri = store
    first = register(tmp_path, uri)
    assert first.decision is not None and first.decision.applied
    client = MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("tasn", "1")
    assert mv.tags[tracking.KFP_RUN_TAG] == "kfp-9" and "Kubeflow run `kfp-9`" in mv.description
    assert ("**baseline** `resnet18-slim`, out size 32 px, trained by run `tasn-resnet18-slim-out32-abcdef`"
            in mv.description)
    assert "test master_aux_top1 **0.6250**" in mv.description and "took `@staging` (promotion #1" in mv.description
    assert "`@staging` = version 1" in client.get_registered_model("tasn").description

    registry.promote(load_config(ROOT / "params.yaml", None, [f"tracking.uri={uri}"]), None, to="production",
                     reason="canary passed")
    assert "took `@production` (promotion #2" in client.get_model_version("tasn", "1").description
    described = client.get_registered_model("tasn").description
    assert "`@production` = version 1" in described and "`@staging` = version 1" in described


@pytest.mark.slow
def test_an_experiment_registers_only_when_asked_and_never_moves_staging(store, monkeypatch):
    """The rule for what registers (register.enabled): every run but a DVC experiment's, which
    registers when asked and even then leaves @staging alone; false registers nothing."""
    tmp_path, uri = store
    register(tmp_path, uri)  # v1 takes staging
    client = MlflowClient(uri, registry_uri=uri)
    monkeypatch.setenv(tracking.DVC_EXP_ENV, "sulky-doze")
    unasked = register(tmp_path, uri)
    assert unasked.decision is None and unasked.registration["version"] is None
    assert unasked.registration["decision"] == "not registered" and unasked.registration["candidate"] == 0.625
    assert "experiments register only when asked (-S register.enabled=true)" in unasked.registration["reason"]
    assert [str(v.version) for v in client.search_model_versions("name='tasn'")] == ["1"]
    asked = register(tmp_path, uri, "register.enabled=true")
    assert asked.decision is None and asked.registration["version"] == "2"
    assert "DVC experiment sulky-doze: experiments never move staging" in asked.registration["reason"]
    monkeypatch.delenv(tracking.DVC_EXP_ENV)
    switched_off = register(tmp_path, uri, "register.promote=false")
    assert switched_off.decision is None and "register.promote is false" in switched_off.registration["reason"]
    never = register(tmp_path, uri, "register.enabled=false")
    assert never.registration["version"] is None and "register.enabled is false" in never.registration["reason"]
    assert str(client.get_model_version_by_alias("tasn", "staging").version) == "1"
    assert "Promotions:" in client.get_model_version("tasn", "3").description  # registered, never promoted
    assert len(client.search_model_versions("name='tasn'")) == 3
