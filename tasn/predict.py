"""The deployable model: the trained network plus everything needed to use it on a raw image.

`Predictor` is an nn.Module whose `forward` maps a normalised batch to the primary head's logits,
and whose `predict` takes image files or PIL images and returns class names and probabilities,
doing the same preprocessing as `tasn evaluate` (shorter side to `preprocess.size`, centre crop
`model.input_size`, normalise).

One loader builds it, wherever the model is: `from_checkpoint` reads a `model.pt` (state dict +
resolved config + class names) with `torch.load(weights_only=True)`; `load_predictor` does the
same for an MLflow model logged by `tasn train` (the pyfunc of `tasn.serving`), downloading only
its MLmodel file and its `weights` artifact, so `tasn predict` and `tasn evaluate` never run code
that came from the registry and never unpickle anything. The pyfunc's own `load_context` calls
`from_checkpoint` too. mlflow is imported inside `load_predictor`, so the training stage (which
builds a Predictor) imports without the MLOps stack.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from tasn import tracking
from tasn.checkpoint import load_model
from tasn.config import TrackingConfig
from tasn.config.schema import DEFAULT_MAX_PIXELS
from tasn.data.images import decode, to_rgb
from tasn.data.transforms import eval_transform
from tasn.errors import DataError, TASNError
from tasn.io import file_sha256
from tasn.model.network import Network

WEIGHTS = "weights"  # the MLflow model's artifact holding model.pt (tasn.serving logs it)
ImageInput = str | os.PathLike[str] | Image.Image


class Predictor(nn.Module):
    """Trained network + class names + preprocessing constants (+ the resolved config it was
    trained with, when it came from a model file).

    `max_pixels` bounds what it decodes: the model's `preprocess.max_pixels` (the limit its
    training images were held to), else the default; an image whose header claims more is refused
    before a pixel is decoded (a 164 KB PNG can claim 169 Mpx, 700 MB decoded)."""

    def __init__(self, model: Network, classes: list[str], input_size: int, resize: int | None,
                 config: dict[str, Any] | None = None):
        super().__init__()
        self.model = model.eval()
        self.classes = list(classes)
        self.input_size = int(input_size)
        self.resize = int(resize) if resize else None
        self.primary_head = model.primary_head
        self.config = config
        self.max_pixels = int(((config or {}).get("preprocess") or {}).get("max_pixels") or DEFAULT_MAX_PIXELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, input_size, input_size) normalised -> (n, classes) primary-head logits."""
        return getattr(self.model(x), self.primary_head)

    def image(self, item: ImageInput, data: bytes | None = None) -> Image.Image:
        """An image file (or `data`, the bytes of one, that `item` names) decoded within
        `max_pixels` as 8-bit RGB the way preprocess does it; a DataError says why it cannot be."""
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"predict: expected an image path or a PIL image, got {type(item).__name__}")
        return to_rgb(decode(item, self.max_pixels, limit_key="the model's preprocess.max_pixels", data=data))

    def preprocess(self, images: Iterable[ImageInput]) -> torch.Tensor:
        transform = eval_transform(self.input_size, self.resize)
        return torch.stack([transform(self.image(item)) for item in images])

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
    return Predictor(model, meta["classes"], config["model"]["input_size"], config["preprocess"]["size"], config)


@dataclass(frozen=True)
class LoadedModel:
    """A Predictor built from an MLflow model, and where that model came from."""

    predictor: Predictor
    model_id: str | None  # the LoggedModel (models:/<model_id>)
    run_id: str | None  # the run that logged it
    sha256: str | None = None  # of its weights (the run's model.pt)


def load_predictor(model_uri: str) -> LoadedModel:
    """The Predictor of an MLflow model logged by `tasn train` (models:/NAME@ALIAS, models:/NAME/V,
    models:/<model_id>, runs:/ID/model, or a downloaded model folder): its MLmodel file and its
    weights are downloaded and read by `from_checkpoint`; none of the model's code runs."""
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(model_uri)
    with tempfile.TemporaryDirectory(prefix="tasn-model-") as tmp:
        mlmodel = Model.load(repo.download_artifacts("MLmodel", dst_path=tmp))
        artifacts = (mlmodel.flavors.get("python_function") or {}).get("artifacts") or {}
        if WEIGHTS not in artifacts:
            raise TASNError(f"{model_uri} is not a tasn model: its pyfunc has no {WEIGHTS!r} artifact "
                            "(a model logged by an older tasn train: train it again)")
        weights = repo.download_artifacts(artifacts[WEIGHTS]["path"], dst_path=tmp)
        predictor, digest = from_checkpoint(weights), file_sha256(weights)
    return LoadedModel(predictor, mlmodel.model_id, mlmodel.run_id, digest)


def check_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """A missing, unreadable, oversized or non-image file is named before any model is loaded."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such image file")
    decode(path, max_pixels, limit_key="max_pixels")


def predict_files(model_uri: str, images: Sequence[str], topk: int, cfg: TrackingConfig) -> list[dict[str, Any]]:
    """`tasn predict`: the top-k classes of raw image files with a logged model (models:/NAME@ALIAS,
    runs:/ID/model, ...) or a `model.pt`; every image is checked before the model is loaded."""
    for path in images:
        check_image(path)  # the default limit here; the model's own (`Predictor.max_pixels`) once loaded
    try:
        if tracking.is_mlflow_uri(model_uri):
            tracking.setup(cfg)
            predictor = load_predictor(model_uri).predictor
        else:
            predictor = from_checkpoint(model_uri, endpoint=cfg.s3_endpoint or None)
    except TASNError:
        raise
    except Exception as exc:  # MLflow and storage raise many kinds for a wrong URI: name the URI
        raise TASNError(f"--model {model_uri}: cannot load the model ({exc})") from exc
    return predictor.predict(images, topk=topk)
