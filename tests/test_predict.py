"""`tasn predict IMAGE... --model models:/<name>@staging` against a real `mlflow server`: the
model registered and promoted through `tasn.registry`, raw synthetic images of several sizes, and
the probabilities checked against the same network run here with torchvision's own functions."""

from __future__ import annotations

import json
import uuid

import mlflow
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from tasn import registry
from tasn.cli import main
from tasn.model import Baseline
from tasn.predict import Predictor, log_model

pytestmark = pytest.mark.integration
CLASSES = ["cardinal", "blue_jay", "wren"]


@pytest.fixture(scope="module")
def staged(mlflow_server):
    """(model name, the in-memory network) with a version holding `staging`."""
    mlflow.set_tracking_uri(mlflow_server.url)
    torch.manual_seed(1)
    net = Baseline(len(CLASSES), "resnet18-slim", out_size=32).eval()
    name = f"predict-{uuid.uuid4().hex[:8]}"
    with mlflow.start_run() as run:
        mlflow.set_tag("data.version", "d1")
        info = log_model(Predictor(net, CLASSES, input_size=32, resize=40))
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


def test_bad_image_and_bad_uri_are_named(staged, images, tracking, tmp_path, capsys):
    name, _ = staged
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", images[0], str(broken), "--model", f"models:/{name}@staging"]) == 1
    assert f"{broken}: not a readable image" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png"), "--model", f"models:/{name}@staging"]) == 1
    assert "missing.png: no such image file" in capsys.readouterr().err
    assert main(["predict", images[0], "--model", f"models:/{name}@production"]) == 1
    assert f"models:/{name}@production: cannot load" in capsys.readouterr().err
