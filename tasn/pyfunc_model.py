"""The MLflow pyfunc of a tasn model, as MLflow's *model from code* file (see tasn.serving).

MLflow copies this file into the logged model and runs it to build the model (`set_model` below);
the model's `code/` folder, on sys.path by then, provides the tasn package it imports. Nothing here
is pickled: the weights are the `weights` artifact (model.pt), read with weights_only=True.

Errors: MLflow's scoring server answers any other exception with a Python stack trace in the
response. So a bad request (`tasn.errors.TASNError`: the row and the problem) becomes an
MlflowException of INVALID_PARAMETER_VALUE (HTTP 400, the message alone), and anything else one of
INTERNAL_ERROR (500) that says only that, its traceback going to the server's log.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

from tasn.errors import TASNError
from tasn.predict import Predictor, from_checkpoint
from tasn.serving import DEFAULT_TOPK, WEIGHTS, predict_frame

log = logging.getLogger(__name__)


class TASNClassifier(PythonModel):
    """Images in (`image` bytes or `path`), class ids, names and probabilities out."""

    predictor: Predictor

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = from_checkpoint(context.artifacts[WEIGHTS])

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return predict_frame(self.predictor, model_input, int((params or {}).get("topk", DEFAULT_TOPK)))
        except TASNError as exc:
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        except Exception:
            log.exception("tasn model: prediction failed")
            raise MlflowException("the model failed on this input (the server's log has the details)",
                                  INTERNAL_ERROR) from None


mlflow.models.set_model(TASNClassifier())
