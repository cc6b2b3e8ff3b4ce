"""`tasn preprocess` as a KFP component: decode, orient, resize; a split manifest and shards."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def preprocess(
    data: Input[Dataset],
    config: str,
    data_version: str,
    prepared: Output[Dataset],
    summary: Output[Metrics],
):
    """Bounding-box-free preprocessing of the raw dataset into the compact training form.

    The stage records the raw data's version in its summary.json (tasn.lineage), where train reads
    it; `data_version` (the data-version task's digest) is an input so that changed data misses the
    cache.
    """
    from components.runtime import log_metrics_json, run_tasn
    from tasn.data.preprocess import SUMMARY

    print(f"data version: {data_version or 'unknown'}", flush=True)
    run_tasn(["preprocess", "--data", data.path, "--out", prepared.path], config)
    log_metrics_json(summary, f"{prepared.path}/{SUMMARY}")
