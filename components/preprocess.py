"""`tasn preprocess` as a KFP component: decode, orient, resize; a split manifest and shards."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def preprocess(
    data: Input[Dataset],
    params_yaml: str,
    profile: str,
    overrides: list,
    prepared: Output[Dataset],
    summary: Output[Metrics],
):
    """Bounding-box-free preprocessing of the raw dataset into the compact training form."""
    from components.runtime import log_metrics_json, run_tasn
    from tasn.data.preprocess import SUMMARY

    run_tasn(["preprocess", "--data", data.path, "--out", prepared.path], params_yaml, profile, overrides)
    log_metrics_json(summary, f"{prepared.path}/{SUMMARY}")
