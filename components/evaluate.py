"""`tasn evaluate` as a KFP component: the five heads, distillation gap, per-class, confusion."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def evaluate(
    prepared: Input[Dataset],
    model: Input[Model],
    params_yaml: str,
    profile: str,
    overrides: list,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    """Evaluate the trained model on the test split and log it to the training run."""
    from components.runtime import log_metrics_json, read_confusion, run_tasn

    run_tasn(
        ["evaluate", "--data", prepared.path, "--model", f"{model.path}/model.pt",
         "--out", evaluation.path, "--run-json", f"{model.path}/run.json"],
        params_yaml, profile, overrides,
    )
    log_metrics_json(metrics, f"{evaluation.path}/metrics.json")
    categories, matrix = read_confusion(f"{evaluation.path}/confusion.csv")
    confusion.log_confusion_matrix(categories, matrix)
