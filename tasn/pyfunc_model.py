"""The MLflow pyfunc of a tasn model, as MLflow's *model from code* file (see tasn.serving).

MLflow copies this file into the logged model and runs it to build the model (`set_model` below);
the model's `code/` folder, on sys.path by then, provides the tasn package it imports. Nothing here
is pickled: the weights are the `weights` artifact (model.pt), read with weights_only=True.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from tasn.predict import Predictor, from_checkpoint
from tasn.serving import DEFAULT_TOPK, WEIGHTS, predict_frame


class TASNClassifier(PythonModel):
    """Images in (`image` bytes or `path`), class ids, names and probabilities out."""

    predictor: Predictor

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = from_checkpoint(context.artifacts[WEIGHTS])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_frame(self.predictor, model_input, int((params or {}).get("topk", DEFAULT_TOPK)))


mlflow.models.set_model(TASNClassifier())
