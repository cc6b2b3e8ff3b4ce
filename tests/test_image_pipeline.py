"""The committed compiled pipeline (pipelines/tasn_pipeline.yaml) run task by task in the CPU image,
the way the KFP v2 backend runs it (tests/fixtures/kfp_pods.py: each executor's command and args
verbatim with its executor input, the environment from the ConfigMaps and Secrets, a read-only root
with the pod's volumes, uid 10001, artifacts handed on through S3), against a real MLflow server and
Ceph RGW reached as Services, on a network that reaches nothing else. Marker `image`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fixtures.images import cluster, head_commit
from fixtures.kfp_pods import DONE, FAILED, SKIPPED, ArtifactStore, PipelineRun
from fixtures.pods import ROOT, Podman
from pipelines.runner import arguments, resolve_config
from tasn.jobspec import WORK_CHECKPOINTS
from tasn.lineage import KFP_RUN_TAG
from tasn.registry.tags import GIT_COMMIT_TAG

pytestmark = pytest.mark.image
PACKAGE = ROOT / "pipelines" / "tasn_pipeline.yaml"


def synth(folder: Path) -> Path:
    """The smoke profile's synthetic dataset, made here (the test's input, not under test)."""
    res = subprocess.run([sys.executable, "-m", "tasn.cli", "data", "synth", str(folder / "raw"), "--params",
                          str(ROOT / "params.yaml"), "--profile", "smoke"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return folder / "raw"


def start(tmp_path: Path, server, network, image: str, raw: Path, retries: bool = True,
          overrides: tuple[str, ...] = ()) -> tuple[PipelineRun, str]:
    """A run of the compiled pipeline on `raw` (uploaded to a fresh bucket), as `tasn pipeline
    submit --profile smoke` would start it, in `image`, with a pod's worth of CPU and memory here."""
    s3 = server.s3
    bucket = s3.make_bucket()
    store = ArtifactStore(s3.client())
    store.upload(raw, f"s3://{bucket}/raw")
    cfg = resolve_config(ROOT / "params.yaml", "smoke", list(overrides))
    args = arguments(f"s3://{bucket}/raw", cfg, image=image, train_cpu="2", train_memory="6Gi")
    run = PipelineRun(PACKAGE, args, cluster(network, s3, f"s3://{bucket}/runs"), store,
                      Podman(tmp_path / "pods", network), pipeline_root=f"s3://{bucket}/v2/artifacts",
                      retries=retries)
    return run, bucket


def report(tasks) -> str:
    """Each task's state; for the failed ones, the reason and the end of the log."""
    lines = []
    for path, t in tasks.items():
        lines.append(f"{path}: {t.state} {t.reason}")
        if t.state == FAILED:
            lines.append(t.log[-4000:])
    return "\n".join(lines)


def test_the_compiled_dag_runs_in_the_image_and_ends_with_staging_on_the_server(cpu_image, pod_mlflow, pod_network,
                                                                               tmp_path):
    run, bucket = start(tmp_path, pod_mlflow, pod_network, cpu_image, synth(tmp_path),
                        overrides=("train.checkpoint_every=1",))
    tasks = run.run()
    assert all(t.state == DONE for t in tasks.values()), report(tasks)
    by_name = {path.rsplit("/", 1)[-1]: t for path, t in tasks.items()}
    assert {"data-version", "validate", "preprocess", "train", "evaluate", "register", "gate", "promote",
            "cleanup"} <= set(by_name), sorted(tasks)

    registered = by_name["register"].parameters
    client = MlflowClient(pod_mlflow.url)
    staged = client.get_model_version_by_alias(registered["name"], "staging")
    assert staged.version == registered["version"]
    assert staged.tags[KFP_RUN_TAG] == run.run_id
    assert staged.tags[GIT_COMMIT_TAG] == head_commit()  # TASN_GIT_COMMIT: the image has no git checkout
    assert by_name["cleanup"].executor_input["inputs"]["parameterValues"]["status"]["state"] == DONE
    # train's checkpoints went to the run's own prefix under TASN_WORK_URI (tasn-s3-config)
    keys = [o["Key"] for o in pod_mlflow.s3.client().list_objects_v2(Bucket=bucket, Prefix=f"runs/{run.run_id}/")
            .get("Contents", [])]
    assert any(k.startswith(f"runs/{run.run_id}/{WORK_CHECKPOINTS}/ckpt-") for k in keys), keys
    # the artifacts went from task to task through the pipeline root, as the launcher hands them
    model = by_name["train"].artifacts["model"]["uri"]
    assert model.startswith(f"s3://{bucket}/v2/artifacts/tasn/{run.run_id}/train/")
    evaluated = by_name["evaluate"].executor_input["inputs"]["artifacts"]["model"]["artifacts"][0]
    assert evaluated["uri"] == model


def test_a_broken_dataset_stops_the_run_at_validate_naming_the_file(cpu_image, pod_mlflow, pod_network, tmp_path):
    raw = synth(tmp_path)
    broken = sorted((raw / "images").rglob("*.jpg"))[3]
    broken.write_bytes(b"not a jpeg at all")
    run, _ = start(tmp_path, pod_mlflow, pod_network, cpu_image, raw, retries=False)
    tasks = run.run()
    by_name = {path.rsplit("/", 1)[-1]: t for path, t in tasks.items()}
    validate = by_name["validate"]
    assert validate.state == FAILED, report(tasks)
    assert validate.attempts[-1].code != 0
    assert broken.relative_to(raw).as_posix() in validate.log, validate.log[-3000:]
    for later in ("preprocess", "train", "evaluate", "register", "gate"):
        assert by_name[later].state == SKIPPED, report(tasks)
    assert "promote" not in by_name  # inside the condition, which was never reached
    assert by_name["cleanup"].state == DONE, report(tasks)  # the exit handler runs however the run ends
    assert by_name["cleanup"].executor_input["inputs"]["parameterValues"]["status"]["state"] == FAILED
