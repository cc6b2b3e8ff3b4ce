"""The servable model: the pyfunc's input and output (unit), its pinned requirements, and the whole
way from the smoke pipeline to `mlflow models serve -m models:/<name>@staging` answering a POST of
a JPEG from the test split with its class name (integration, real `mlflow server` on loopback)."""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from fixtures.models import CLASSES, baseline_model
from fixtures.servers import free_port, wait_http
from tasn import evaluate as evaluation
from tasn import registry, serving, tracking
from tasn.errors import DataError
from tasn.predict import from_checkpoint
from tasn.training import outputs, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, net, predictor = baseline_model(tmp_path_factory.mktemp("serving-model"), seed=5)
    return net, predictor


def first_test_image(raw: Path) -> Path:
    """The first image that train_test_split.txt puts in the test split (`<id> 0`)."""
    paths = dict(line.split() for line in (raw / "images.txt").read_text().splitlines())
    test = next(i for i, flag in (line.split() for line in (raw / "train_test_split.txt").read_text().splitlines())
                if flag == "0")
    return raw / "images" / paths[test]


def jpeg(seed: int, size=(47, 61)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_rows_of_bytes_base64_text_or_paths_answer_like_the_predictor(model, tmp_path, monkeypatch):
    _, predictor = model
    images = [jpeg(i) for i in range(3)]
    (tmp_path / "birds").mkdir()
    (tmp_path / "birds" / "bird.jpg").write_bytes(images[2])
    monkeypatch.setenv(serving.IMAGE_ROOT_ENV, str(tmp_path))  # the folder this server reads paths under
    frame = pd.DataFrame({serving.IMAGE: [images[0], base64.b64encode(images[1]).decode(), None],
                          serving.PATH: [None, None, "birds/bird.jpg"]})
    out = serving.predict_frame(predictor, frame, topk=2)
    want = predictor.predict([Image.open(io.BytesIO(b)).convert("RGB") for b in images], topk=2)
    assert out["class_name"].tolist() == [w["class_name"] for w in want]
    assert out["class_id"].tolist() == [w["class_id"] for w in want]
    assert out["prob"].tolist() == pytest.approx([w["prob"] for w in want], abs=1e-6)
    assert out["topk_class_names"].tolist() == [[t["class_name"] for t in w["topk"]] for w in want]
    assert all(len(p) == 2 and p[0] >= p[1] for p in out["topk_probs"]) and set(out["class_name"]) <= set(CLASSES)


def test_bad_rows_are_named(model):
    _, predictor = model
    with pytest.raises(DataError, match=r"row 1: neither 'image' nor 'path'"):
        serving.images_from_frame(pd.DataFrame({serving.IMAGE: [jpeg(0), None]}), predictor)
    with pytest.raises(DataError, match=r"row 0: column 'image': not an image"):
        serving.images_from_frame(pd.DataFrame({serving.IMAGE: [b"not an image"]}), predictor)
    with pytest.raises(DataError, match=r"needs a column 'image'.*or 'path'"):
        serving.images_from_frame(pd.DataFrame({"pixels": [1]}), predictor)
    with pytest.raises(DataError, match="row 0: column 'path' is not served here"):
        serving.predict_frame(predictor, pd.DataFrame({serving.PATH: ["/nonexistent/bird.jpg"]}))


def _imported_modules() -> dict[str, set[str]]:
    """Third-party modules the tasn modules loaded by the pyfunc import at their top level, each
    with the distributions that provide it."""
    code = ("import sys, json, tasn.pyfunc_model; "
            "print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items()) "
            "if (n == 'tasn' or n.startswith('tasn.')) and getattr(m, '__file__', None))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    files = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    tops: set[str] = set()
    for file in files:
        for node in ast.parse(Path(file).read_text()).body:
            if isinstance(node, ast.Import):
                tops.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    return {t: {d.lower() for d in owners[t]} for t in tops - set(sys.stdlib_module_names) - {"tasn", "__future__"}}


def test_requirements_pin_every_distribution_the_pyfunc_imports():
    pinned = dict(r.split("==") for r in serving.pip_requirements())
    unpinned = {t: d for t, d in _imported_modules().items() if not d & {p.lower() for p in pinned}}
    assert not unpinned, f"imported by the pyfunc but not in its requirements: {unpinned}"
    assert {"torch", "torchvision", "mlflow"} <= set(pinned)
    for dist, version in pinned.items():
        assert importlib.metadata.version(dist).split("+")[0] == version, dist


@pytest.mark.integration
@pytest.mark.slow
def test_the_staged_model_serves_a_jpeg_from_the_test_split(mlflow_server, smoke_data, tmp_path,  # noqa: F811
                                                             monkeypatch):
    name = f"serve-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(tracking.KFP_RUN_ID_ENV, "kfp-run-42")
    cfg = smoke_config(f"tracking.uri={mlflow_server.url}", "tracking.system_metrics=false",
                       f"tracking.experiment={name}", f"register.model_name={name}", "evaluate.timing_batches=1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = train(cfg, smoke_data, tmp_path / "train")
    finally:
        torch.set_num_threads(threads)
    scored = evaluation.evaluate(cfg, smoke_data, str(tmp_path / "train" / outputs.MODEL), tmp_path / "evaluate",
                                 run_id=trained.run.run_id)
    registered = registry.register(cfg, tmp_path / "train" / outputs.RUN, tmp_path / "evaluate" / evaluation.METRICS,
                                   tmp_path / "register", promote=True)
    assert registered.decision is not None and registered.decision.applied

    # the run: a name of its own, its data as a dataset input, the context, no duplicate commit tag
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(trained.run.run_id)
    assert re.fullmatch(r"tasn-resnet18-slim-out48-[0-9a-f]{6}", run.info.run_name)
    (used,) = run.inputs.dataset_inputs
    version = run.data.tags[tracking.DATA_VERSION_TAG]
    assert used.dataset.digest == tracking.dataset_digest(version) if version != "untracked" else used.dataset.digest
    assert json.loads(used.dataset.source)["uri"] == str(smoke_data.resolve())
    assert {(t.key, t.value) for t in used.tags} >= {("mlflow.data.context", "training")}
    assert run.data.tags[tracking.KFP_RUN_TAG] == "kfp-run-42" and "git.commit" not in run.data.tags

    # the version: described, its evaluation metrics on its LoggedModel (the version's source model)
    mv = client.get_model_version(name, "1")
    model_id = trained.run.model_uri.removeprefix("models:/")
    assert mv.source == f"models:/{model_id}" and mv.tags[tracking.KFP_RUN_TAG] == "kfp-run-42"
    logged = {m.key: m for m in client.get_logged_model(model_id).metrics}
    for key in ("top1", "master_aux_top1", "distill_agreement"):
        assert logged[f"test_{key}"].value == pytest.approx(scored.metrics[key]), key
        assert logged[f"test_{key}"].dataset_digest == used.dataset.digest
    primary = scored.metrics[cfg.register.primary_metric]
    assert f"Data version `{mv.tags['data_version']}`" in mv.description
    assert f"{cfg.register.primary_metric} **{primary:.4f}**" in mv.description
    assert "took `@staging`" in mv.description and "by the gate" in mv.description
    described = client.get_registered_model(name).description
    assert "fine-grained image classifier" in described and "`@staging` = version 1" in described

    # serve it: MLflow's pickle switch off, and a poisoned `tasn` first on PYTHONPATH, so only the
    # code packaged with the model can answer
    poison = tmp_path / "poison" / "tasn"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('not the code packaged with the model')\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PYTHONPATH": str(poison.parent), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@staging",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc, log=log)
        image = first_test_image(smoke_data.parent / "raw")
        body = json.dumps({"dataframe_records": [{serving.IMAGE: base64.b64encode(image.read_bytes()).decode()}],
                           "params": {"topk": 2}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            (answer,) = json.loads(resp.read())["predictions"]
        # a bad request: a JSON message naming the row and the problem, no stack trace, no file read
        bad = json.dumps({"dataframe_records": [{serving.PATH: "/etc/passwd"}]}).encode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=bad,
                                                          headers={"Content-Type": "application/json"}), timeout=60)
        error = json.loads(refused.value.read())
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    want = from_checkpoint(str(tmp_path / "train" / outputs.MODEL)).predict([image], topk=2)[0]
    assert answer["class_name"] == want["class_name"] and answer["class_id"] == want["class_id"]
    assert answer["prob"] == pytest.approx(want["prob"], abs=1e-5) and len(answer["topk_class_names"]) == 2
    assert refused.value.code == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "row 0: column 'path' is not served here" in error["message"] and "stack_trace" not in error
