"""The model as MLflow serves it: an MLflow pyfunc that takes images and answers with classes.

`tasn train` logs the model with `log_model` as an MLflow *model from code*: the pyfunc is the
small file `tasn/pyfunc_model.py`, which MLflow runs to build the model, and the weights are one
artifact, the `model.pt` of the training run (state dict + resolved config + class names), read
with `torch.load(weights_only=True)` by `tasn.predict.from_checkpoint`. Nothing is pickled, so
loading never needs MLFLOW_ALLOW_PICKLE_DESERIALIZATION. The tasn package travels with the model
(`code_paths`: the code that trained it) and the requirements are pinned to the versions of this
environment, so `mlflow models serve -m models:/tasn@staging` runs outside this checkout.

Input: a DataFrame, one row per image, with a column `image` (the image file's bytes; in JSON they
are base64, which MLflow's scoring server decodes for a binary column, and base64 text is decoded
here too) or `path` (a relative path under the folder $TASN_SERVE_IMAGE_ROOT names; a server
without it reads no path at all). Output, one row per image: `class_id`, `class_name`, `prob`, and
the top k (param `topk`, default 5) as lists `topk_class_ids`, `topk_class_names`, `topk_probs`.
The preprocessing is `Predictor.predict`'s, the same as `tasn evaluate`'s, and no image is decoded
past the model's pixel limit (`Predictor.max_pixels`). A bad request is answered with a JSON
message naming the row and the problem, never a stack trace (`tasn/pyfunc_model.py`).

`tasn predict` and `tasn evaluate` load such a model with `tasn.predict.load_predictor`, which
reads the weights artifact with the same loader and never runs code that came from the registry.
(`mlflow models serve` runs the packaged code, as every pyfunc does: serve models only from a
registry whose writers you trust.)

mlflow is imported inside the functions that need it: the training stage imports this module and
trains with tracking off on a machine without the MLOps stack.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from tasn.errors import DataError, shown
from tasn.paths import path_problem
from tasn.predict import WEIGHTS, Predictor

IMAGE = "image"  # input column: image file bytes (base64 in JSON)
PATH = "path"  # input column: an image file under the server's image folder (IMAGE_ROOT_ENV)
IMAGE_ROOT_ENV = "TASN_SERVE_IMAGE_ROOT"  # the one folder whose images a server may read by `path` (unset: none)
DEFAULT_TOPK = 5
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE = Path(__file__).parent
# What the serving path imports, by distribution (tests/test_serving.py checks the list is complete).
SERVING_DISTRIBUTIONS = ("mlflow", "numpy", "pandas", "pillow", "pyyaml", "torch", "torchvision")


# -- the pyfunc's behaviour (plain functions: tests call them without MLflow) ------------------

def _bytes(value: Any, row: int) -> bytes:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise DataError(f"row {row}: column {IMAGE!r} is text but not base64 ({exc})") from exc
    return bytes(value)


def _served_path(value: str, row: int) -> Path:
    """The file a `path` cell names, which must lie under the folder $TASN_SERVE_IMAGE_ROOT names
    (`tasn.paths.path_problem`); one answer for every refusal, so a client learns nothing about
    files outside that folder, not even whether they exist."""
    root = os.environ.get(IMAGE_ROOT_ENV)
    if not root:
        raise DataError(f"row {row}: column {PATH!r} is not served here: send the image's bytes in {IMAGE!r} "
                        f"(a server reads paths only under the folder its {IMAGE_ROOT_ENV} names)")
    if path_problem(root, value) is not None or not (Path(root) / value).is_file():
        raise DataError(f"row {row}: {shown(value)} is not an image file under the server's image folder")
    return Path(root) / value


def images_from_frame(frame: pd.DataFrame, predictor: Predictor) -> list[Image.Image]:
    """Each row's image, decoded within the model's pixel limit (`Predictor.image`): its `image`
    bytes, else its `path` (`_served_path`); a row with neither is named."""
    if IMAGE not in frame and PATH not in frame:
        raise DataError(f"input needs a column {IMAGE!r} (image bytes, base64 in JSON) or {PATH!r} "
                        f"(an image file); got columns {shown(list(frame.columns))}")
    out: list[Image.Image] = []
    for row, record in enumerate(frame.to_dict(orient="records")):
        data, path = record.get(IMAGE), record.get(PATH)
        if data is not None and not (isinstance(data, float) and pd.isna(data)):
            out.append(predictor.image(f"row {row}: column {IMAGE!r}", data=_bytes(data, row)))
        elif isinstance(path, str) and path:
            out.append(predictor.image(_served_path(path, row)))
        else:
            raise DataError(f"row {row}: neither {IMAGE!r} nor {PATH!r} is set")
    return out


def predict_frame(predictor: Predictor, frame: pd.DataFrame, topk: int = DEFAULT_TOPK) -> pd.DataFrame:
    """The pyfunc's predict: one output row per input row (see the module docstring)."""
    results = predictor.predict(images_from_frame(frame, predictor), topk=topk)
    return pd.DataFrame([{
        "class_id": r["class_id"], "class_name": r["class_name"], "prob": r["prob"],
        "topk_class_ids": [t["class_id"] for t in r["topk"]],
        "topk_class_names": [t["class_name"] for t in r["topk"]],
        "topk_probs": [t["prob"] for t in r["topk"]],
    } for r in results])


def example_jpeg(side: int) -> bytes:
    """A plain grey JPEG at the training size: the input example shows the format, not a bird."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buf, format="JPEG")
    return buf.getvalue()


# -- what MLflow records about it ------------------------------------------------------------

def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE, required=False),
                       ColSpec(DataType.string, PATH, required=False)]),
        outputs=Schema([ColSpec(DataType.long, "class_id"), ColSpec(DataType.string, "class_name"),
                        ColSpec(DataType.double, "prob"), ColSpec(Array(DataType.long), "topk_class_ids"),
                        ColSpec(Array(DataType.string), "topk_class_names"),
                        ColSpec(Array(DataType.double), "topk_probs")]),
        params=ParamSchema([ParamSpec("topk", DataType.long, DEFAULT_TOPK)]),
    )


def pip_requirements() -> list[str]:
    """Each distribution the serving path imports, pinned to the installed version (a local
    label such as torch's `+cu130` dropped: `==2.14.1` matches every build of 2.14.1)."""
    return [f"{d}=={importlib.metadata.version(d).split('+')[0]}" for d in SERVING_DISTRIBUTIONS]


def copy_package(dest: Path) -> Path:
    """The tasn package as it is now (sources and the op's C++/CUDA files, no caches or builds),
    copied to `dest/tasn`: the model's `code_paths`."""
    target = dest / PACKAGE.name
    shutil.copytree(PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "prebuilt"))
    return target


def log_model(weights: str | Path, predictor: Predictor, name: str = "model", step: int = 0) -> Any:
    """Log the pyfunc to the active MLflow run; returns MLflow's ModelInfo (`.model_uri` is
    models:/<model_id>). `weights` is the run's model.pt; `predictor` the same network in memory
    (its class names and sizes become the model's metadata); `name` the LoggedModel's name (`tasn
    train` gives it the registered model's, `register.model_name`, so the run's model and its
    registered versions read alike in the UI); `step` the optimizer step it is the model of
    (MLflow links the run's metrics of that step to it)."""
    import mlflow

    frame = pd.DataFrame({IMAGE: [example_jpeg(predictor.resize or predictor.input_size)]})
    with tempfile.TemporaryDirectory(prefix="tasn-model-code-") as tmp:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_FILE),
            artifacts={WEIGHTS: str(weights)},
            code_paths=[str(copy_package(Path(tmp)))],
            signature=signature(),
            input_example=frame,
            pip_requirements=pip_requirements(),
            step=step,
            metadata={"classes": predictor.classes, "input_size": predictor.input_size,
                      "resize": predictor.resize, "primary_head": predictor.primary_head},
        )
