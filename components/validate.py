"""`tasn validate` as a KFP component: the great-expectations suite gates the whole run."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def validate(
    data: Input[Dataset],
    config: str,
    data_version: str,
    validated: Output[Dataset],
    report: Output[HTML],
    summary: Output[Metrics],
):
    """Validate the raw CUB-layout dataset; fails the task (and the run) on any broken rule.

    `config`: the `validate` section (pipelines/stage_configs.py); `data_version`: the data-version
    task's digest of `data_uri`, an input only so that changed data misses the cache.
    """
    import shutil

    from components.runtime import log_metrics_json, run_tasn
    from tasn.data.validate import REPORT, SUMMARY

    print(f"data version: {data_version or 'unknown'}", flush=True)
    run_tasn(["validate", "--data", data.path, "--report-dir", validated.path], config)
    shutil.copyfile(f"{validated.path}/{REPORT}", report.path)
    log_metrics_json(summary, f"{validated.path}/{SUMMARY}")
