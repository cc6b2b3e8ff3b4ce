"""`tasn predict IMAGE... --model models:/<name>@staging` against a real `mlflow server`: the
model logged as `tasn train` logs it, registered and promoted through `tasn.registry`, raw
synthetic images of several sizes, and the probabilities checked against the same network run here
with torchvision's own functions. Loading never unpickles: it works with MLflow's pickle switch
off, and nothing in the project turns it on."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fixtures.models import CLASSES, baseline_model, log_baseline
from tasn import evaluate, registry
from tasn.cli import main
from tasn.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


@pytest.fixture(scope="module")
def staged(mlflow_server, tmp_path_factory):
    """(model name, the in-memory network) with a version holding `staging`."""
    mlflow.set_tracking_uri(mlflow_server.url)
    name = f"predict-{os.urandom(4).hex()}"
    with mlflow.start_run() as run:
        mlflow.set_tag("data.version", "d1")
        info, net = log_baseline(tmp_path_factory.mktemp("predict-model"))
    mv = registry.register_version(run.info.run_id, info.model_uri, {"master_aux_top1": 0.5}, name)
    assert registry.gate(name, mv.version).applied
    return name, net


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (50, 80), (41, 41)]):
        p = tmp_path / f"bird{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def expected_probs(net, path):
    """Shorter side to 40 (bicubic), centre crop 32, ImageNet normalisation, softmax."""
    img = Image.open(path).convert("RGB")
    img = TF.center_crop(TF.resize(img, 40, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), 32)
    x = TF.normalize(TF.to_tensor(img), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        return torch.softmax(net(x[None]).logits, dim=1)[0].numpy()


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv(PICKLE_ENV, "false")  # MLflow 3.17 allows pickle by default: prove it is not needed


def test_predict_json_matches_the_network(staged, images, tracking, capsys):
    name, net = staged
    assert main(["predict", *images, "--model", f"models:/{name}@staging", "--topk", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == images
    for r in results:
        probs = expected_probs(net, r["image"])
        order = np.argsort(-probs)[:2]
        assert [t["class_id"] for t in r["topk"]] == order.tolist()
        assert [t["class_name"] for t in r["topk"]] == [CLASSES[i] for i in order]
        assert [t["prob"] for t in r["topk"]] == pytest.approx(probs[order].tolist(), abs=1e-5)
        assert (r["class_id"], r["class_name"]) == (int(order[0]), CLASSES[order[0]])


def test_predict_prints_the_topk(staged, images, tracking, capsys):
    name, net = staged
    assert main(["predict", images[0], "--model", f"models:/{name}@staging", "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and len(lines) == 4
    probs = expected_probs(net, images[0])
    for rank, (line, i) in enumerate(zip(lines[1:], np.argsort(-probs)), 1):
        cells = line.split()
        assert cells == [f"{rank}.", str(i), CLASSES[i], f"{probs[i]:.4f}"]


def test_a_model_file_predicts_like_the_registered_model(images, tmp_path, capsys):
    path, net, _ = baseline_model(tmp_path / "m", seed=3)
    assert main(["predict", images[1], "--model", str(path), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    probs = expected_probs(net, images[1])
    assert result["class_name"] == CLASSES[int(np.argmax(probs))]
    assert result["prob"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_predict_and_evaluate_load_without_unpickling(staged, images, tracking):
    """With MLflow's pickle switch off, both loaders read the weights (state dict + config,
    weights_only=True); neither turns the switch on."""
    name, net = staged
    loaded = evaluate.load(f"models:/{name}@staging", load_config(ROOT / "params.yaml"))
    assert os.environ[PICKLE_ENV] == "false"
    assert loaded.predictor.classes == CLASSES and loaded.model_id and loaded.run_id
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.predictor.model.state_dict()[key], value), key
    assert main(["predict", images[0], "--model", f"models:/{name}/1"]) == 0
    assert os.environ[PICKLE_ENV] == "false"


def _names_the_switch(path: Path) -> bool:
    """Python that holds the variable's name as a string (to set it, directly or through a
    constant); any other file that sets it to a true value."""
    text = path.read_text(errors="ignore")
    if path.suffix == ".py":
        tree = ast.parse(text)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        return any(isinstance(n, ast.Constant) and n.value == PICKLE_ENV and id(n) not in docstrings
                   for n in ast.walk(tree))
    return re.search(rf"{PICKLE_ENV}['\"]?\s*[:=]\s*['\"]?(true|1|yes|on)\b", text, re.IGNORECASE) is not None


def test_the_project_never_allows_pickle_deserialization():
    """No file of the project outside the tests (code, config, manifests, scripts, docs) turns
    MLflow's pickle switch on: every file git tracks or would track is read."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    found = [f for f in listed if not f.startswith(("tests/", "dvc-storage/")) and (ROOT / f).is_file()
             and _names_the_switch(ROOT / f)]
    assert not found, f"{PICKLE_ENV} is turned on in {found}"


def test_bad_image_and_bad_uri_are_named(staged, images, tracking, tmp_path, capsys):
    name, _ = staged
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", images[0], str(broken), "--model", f"models:/{name}@staging"]) == 1
    assert f"{broken}: not an image" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png"), "--model", f"models:/{name}@staging"]) == 1
    assert "missing.png: no such image file" in capsys.readouterr().err
    assert main(["predict", images[0], "--model", f"models:/{name}@production"]) == 1
    assert f"models:/{name}@production: cannot load" in capsys.readouterr().err
