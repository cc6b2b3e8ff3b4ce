"""`tasn evaluate` as a KFP component: the five heads, distillation gap, per-class, confusion."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def evaluate(
    prepared: Input[Dataset],
    model: Input[Model],
    config: str,
    kfp_run_id: str,
    mlflow_config_map: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    """Evaluate the trained model on the test split and log it to the training run."""
    from components.runtime import log_metrics_json, read_confusion, run_tasn
    from tasn.evaluate import CONFUSION_CSV, METRICS
    from tasn.training.outputs import MODEL, RUN

    run_tasn(
        ["evaluate", "--data", prepared.path, "--model", f"{model.path}/{MODEL}",
         "--out", evaluation.path, "--run-json", f"{model.path}/{RUN}"],
        config, kfp_run_id=kfp_run_id, mlflow_config_map=mlflow_config_map,
    )
    log_metrics_json(metrics, f"{evaluation.path}/{METRICS}")
    categories, matrix = read_confusion(f"{evaluation.path}/{CONFUSION_CSV}")
    confusion.log_confusion_matrix(categories, matrix)
