"""The data version of the raw dataset as a KFP component: the digest that keys the data stages' cache."""

from kfp import dsl

from components import TASN_IMAGE


@dsl.component(base_image=TASN_IMAGE, install_kfp_package=False)
def data_version(data_uri: str) -> str:
    """`tasn.lineage.data_version(data_uri)`: an S3 prefix's listing digest (no download), a local
    folder's DVC md5; "" when nothing is there. The importer brings the data in with
    `reimport=False`, so without this input the validate and preprocess tasks would be served from
    the cache after the data at `data_uri` changed in place."""
    from tasn.lineage import data_version

    version = data_version(data_uri)
    print(f"data version of {data_uri}: {version or 'unknown (no files there)'}", flush=True)
    return version or ""
