"""`tasn validate` as a KFP component: the great-expectations suite gates the whole run."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def validate(
    data: Input[Dataset],
    params_yaml: str,
    profile: str,
    overrides: list,
    validated: Output[Dataset],
    report: Output[HTML],
    summary: Output[Metrics],
):
    """Validate the raw CUB-layout dataset; fails the task (and the run) on any broken rule."""
    import shutil

    from components.runtime import log_metrics_json, run_tasn
    from tasn.data.validate import REPORT, SUMMARY

    run_tasn(["validate", "--data", data.path, "--report-dir", validated.path], params_yaml, profile, overrides)
    shutil.copyfile(f"{validated.path}/{REPORT}", report.path)
    log_metrics_json(summary, f"{validated.path}/{SUMMARY}")
