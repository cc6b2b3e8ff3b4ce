"""The deployable model: the trained network plus everything needed to use it on a raw image.

`Predictor` is an nn.Module whose `forward` maps a normalised batch to the primary head's logits
(what MLflow's pyfunc flavour and TorchServe-style servers call), and whose `predict` takes image
files or PIL images and returns class names and probabilities, doing the same preprocessing as
`tasn evaluate` (shorter side to `preprocess.size`, centre crop `model.input_size`, normalise).

It is logged to MLflow with pickle serialization: the default `pt2` format exports `forward` as a
traced graph and loads back as a bare GraphModule, which would lose `predict` and the class
names. MLflow 3.17 refuses to unpickle unless MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true (the model
is code: load only models from a tracking server you trust); `load_predictor` sets it for the one
call. mlflow is imported inside the two functions that talk to it, so the training stage (which
builds a Predictor to log) imports without the MLOps stack.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from tasn import tracking
from tasn.checkpoint import load_model
from tasn.config import TrackingConfig
from tasn.data.transforms import eval_transform
from tasn.errors import DataError, TASNError
from tasn.model.network import Network

PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
ImageInput = str | os.PathLike[str] | Image.Image


class Predictor(nn.Module):
    """Trained network + class names + preprocessing constants."""

    def __init__(self, model: Network, classes: list[str], input_size: int, resize: int | None):
        super().__init__()
        self.model = model.eval()
        self.classes = list(classes)
        self.input_size = int(input_size)
        self.resize = int(resize) if resize else None
        self.primary_head = model.primary_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, input_size, input_size) normalised -> (n, classes) primary-head logits."""
        return getattr(self.model(x), self.primary_head)

    def preprocess(self, images: Iterable[ImageInput]) -> torch.Tensor:
        transform = eval_transform(self.input_size, self.resize)
        batch = []
        for item in images:
            if isinstance(item, (str, os.PathLike)):
                path = Path(item)
                if not path.is_file():
                    raise FileNotFoundError(f"predict: no image file at {path}")
                with Image.open(path) as img:
                    item = img.convert("RGB")
            elif isinstance(item, Image.Image):
                item = item.convert("RGB")
            else:
                raise TypeError(f"predict: expected an image path or a PIL image, got {type(item).__name__}")
            batch.append(transform(item))
        return torch.stack(batch)

    @torch.inference_mode()
    def predict(self, images: Iterable[ImageInput], topk: int = 5, batch_size: int = 16) -> list[dict[str, Any]]:
        """For each image: {class_id, class_name, prob, topk: [{class_id, class_name, prob}, ...]}."""
        self.eval()
        device = next(self.parameters()).device
        k = max(1, min(int(topk), len(self.classes)))
        results = []
        images = list(images)
        for start in range(0, len(images), batch_size):
            x = self.preprocess(images[start:start + batch_size]).to(device)
            probs = torch.softmax(self(x).float(), dim=1).cpu()
            top_p, top_i = probs.topk(k, dim=1)
            for p_row, i_row in zip(top_p.tolist(), top_i.tolist()):
                ranked = [{"class_id": i, "class_name": self.classes[i], "prob": p} for p, i in zip(p_row, i_row)]
                results.append({**ranked[0], "topk": ranked})
        return results


def from_checkpoint(path_or_uri: str, endpoint: str | None = None) -> Predictor:
    """A Predictor from a `model.pt` (or training checkpoint) written by `tasn train`."""
    model, meta = load_model(path_or_uri, endpoint=endpoint)
    config = meta["config"]
    return Predictor(model, meta["classes"], config["model"]["input_size"], config["preprocess"]["size"])


def log_model(predictor: Predictor, name: str = "model", registered_model_name: str | None = None) -> Any:
    """Log to the active MLflow run; returns MLflow's ModelInfo (`.model_uri` loads it back)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = predictor.input_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(predictor.classes)))]),
    )
    predictor = predictor.cpu().eval()
    return mlflow.pytorch.log_model(
        predictor,
        name=name,
        serialization_format="pickle",
        signature=signature,
        # explicit, so MLflow does not load the model in a subprocess to infer them
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}", "pillow", "tasn"],
        registered_model_name=registered_model_name,
        metadata={"classes": predictor.classes, "input_size": size, "resize": predictor.resize,
                  "primary_head": predictor.primary_head},
    )


@contextlib.contextmanager
def _pickle_allowed() -> Iterator[None]:
    old = os.environ.get(PICKLE_ENV)
    os.environ[PICKLE_ENV] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PICKLE_ENV, None)
        else:
            os.environ[PICKLE_ENV] = old


def load_predictor(model_uri: str) -> Predictor:
    """`mlflow.pytorch.load_model` for a Predictor logged by `log_model` (runs:/, models:/...)."""
    import mlflow

    with _pickle_allowed():
        predictor: Predictor = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return predictor


def check_image(path: str | os.PathLike[str]) -> None:
    """A missing, unreadable or non-image file is named before any model is loaded."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    try:
        with Image.open(p) as img:
            img.load()
    except Exception as exc:  # PIL raises several types for broken files
        raise DataError(f"{p}: not a readable image ({exc})") from exc


def predict_files(model_uri: str, images: Sequence[str], topk: int, cfg: TrackingConfig) -> list[dict[str, Any]]:
    """`tasn predict`: the top-k classes of raw image files with a logged model (models:/NAME@ALIAS,
    runs:/ID/model, ...); every image is checked before the model is loaded."""
    for path in images:
        check_image(path)
    if tracking.is_mlflow_uri(model_uri):
        tracking.setup(cfg)
    try:
        predictor = load_predictor(model_uri)
    except Exception as exc:  # MLflow raises many kinds for a wrong URI: name the URI
        raise TASNError(f"--model {model_uri}: cannot load the model ({exc})") from exc
    try:
        return predictor.predict(images, topk=topk)
    except OSError as exc:
        raise DataError(f"cannot read an image: {exc}") from exc
