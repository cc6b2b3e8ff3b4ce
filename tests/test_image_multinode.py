"""Multi-node training in containers (marker `image`): the trainer that tasn/jobspec.py renders for a
Kubeflow Trainer v2.1 TrainJob, as the Trainer runs it (tests/fixtures/trainer_pods.py), in two pods
of the CPU image on one podman network, gloo on CPU, data and checkpoints on S3 (Ceph RGW).

One node's pod is killed mid-epoch, after a checkpoint reached S3, and the whole gang is started
again, as JobSet restarts a TrainJob (every pod deleted and created anew). The run resumes from that
checkpoint and must train to what one process trains with the same global batch of 8 (2 accumulated
micro-batches of 4, in a pod of the same image): the settings of tests/test_train.py's torchrun
check (the baseline with BatchNorm on running statistics, whose per-rank batch statistics would be
the one legitimate difference; a constant learning rate), every step's loss and the final weights.
"""

from __future__ import annotations

import csv
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from fixtures.images import cluster
from fixtures.kfp_pods import ArtifactStore
from fixtures.pods import ROOT, EmptyDir, Pod, Podman
from fixtures.trainer_pods import node_pods
from tasn import checkpoint
from tasn.jobspec import WORK_CHECKPOINTS, WORK_OUT, TrainJobSpec, job_name, render_trainjob
from tasn.model import build_model
from tasn.training.outputs import MODEL, STEPS
from tasn.training.sampling import seed_everything

pytestmark = pytest.mark.image
SETTINGS = ["model.kind=baseline", "train.batchnorm=frozen", "tracking.enabled=false", "train.picture_images=0",
            "train.lr=0.01", "train.schedule=step", "train.warmup_epochs=0", "model.zero_init_residual=false",
            "train.deterministic=true", "train.epochs=2", "train.checkpoint_every=2", "train.workers=0"]


def steps(out: Path) -> list[dict]:
    with (out / STEPS).open() as fh:
        return list(csv.DictReader(fh))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / MODEL, map_location="cpu", weights_only=True)["model"]


def finish(pods: Podman, gang: list[Pod], procs: list[subprocess.Popen], timeout: float = 900) -> None:
    for pod, proc in zip(gang, procs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pods.kill(pod.name)
            proc.wait(timeout=60)
        assert proc.returncode == 0, f"{pod.name} exited {proc.returncode}:\n{pods.log(pod.name)[-4000:]}"


def distance(a: dict, b: dict) -> float:
    return float(torch.cat([(a[k] - b[k]).flatten() for k in a if a[k].is_floating_point()]).norm())


def test_two_nodes_killed_and_restarted_train_as_one_process(cpu_image, pod_mlflow, pod_network, smoke_data,  # noqa: F811
                                                             tmp_path):
    s3 = pod_mlflow.s3
    bucket = s3.make_bucket()
    store = ArtifactStore(s3.client())
    store.upload(smoke_data, f"s3://{bucket}/prepared")
    namespace = cluster(pod_network, s3, f"s3://{bucket}/runs")
    runtime = yaml.safe_load((ROOT / "infra" / "k8s" / "base" / "training-runtime.yaml").read_text())
    pods = Podman(tmp_path / "pods", pod_network)

    # one process, the global batch as 2 micro-batches of 4, in a pod of the same image
    one = Pod(name=f"one-{uuid.uuid4().hex[:6]}", image=cpu_image, user="10001:10001",
              args=["train", "--data", "/workspace/data", "--out", "/workspace/out", "--profile", "smoke",
                    *[a for s in [*SETTINGS, "train.batch_size=4", "train.accum_steps=2"] for a in ("-S", s)]],
              empty_dirs={"/workspace": EmptyDir(), "/tmp": EmptyDir()},
              prepared={"/workspace": tmp_path / "one"}, cpu="2", memory="3Gi")
    (tmp_path / "one").mkdir()
    store.download(f"s3://{bucket}/prepared", tmp_path / "one" / "data")
    done = pods.run(one)
    assert done.code == 0, done.log[-4000:]

    # two nodes x 4 images: node 1 dies after the step-2 checkpoint reached S3; JobSet deletes node 0
    # too and creates both again
    work = f"s3://{bucket}/work"
    spec = TrainJobSpec(image=cpu_image, num_nodes=2, gpus_per_node=0, data_uri=f"s3://{bucket}/prepared",
                        work_uri=work, profile="smoke", overrides=[*SETTINGS, "train.batch_size=4"],
                        cpu_per_node="1", memory_per_node="3Gi", kfp_run_id=uuid.uuid4().hex)
    environ = {k: v for data in namespace.config_maps.values() for k, v in data.items()}  # the launcher task's
    job = render_trainjob(spec, job_name(work), environ=environ)
    gang = node_pods(job, runtime, namespace, pod_network)
    procs = [pods.start(p) for p in gang]
    wanted = f"work/{WORK_CHECKPOINTS}/{checkpoint.checkpoint_name(2)}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if s3.client().list_objects_v2(Bucket=bucket, Prefix=wanted).get("KeyCount"):
            break
        time.sleep(0.2)
    for pod in reversed(gang):
        pods.kill(pod.name)
    for proc in procs:
        proc.wait(timeout=60)
    assert procs[1].returncode != 0, pods.log(gang[1].name)[-3000:]
    assert not s3.client().list_objects_v2(Bucket=bucket, Prefix=f"work/{WORK_OUT}/").get("KeyCount"), \
        "the job finished before the kill: nothing would be resumed"
    again = node_pods(job, runtime, namespace, pod_network, attempt=1)
    finish(pods, again, [pods.start(p) for p in again])
    assert f"resuming from s3://{bucket}/{wanted}" in pods.log(again[0].name), pods.log(again[0].name)[-3000:]
    store.download(f"{work}/{WORK_OUT}", tmp_path / "two")

    two, reference = steps(tmp_path / "two"), steps(tmp_path / "one" / "out")
    assert [r["step"] for r in two] == [str(i) for i in range(1, 7)]
    assert len({r["loss"] for r in reference}) == 6  # a real curve
    # the same kernels on the same 4-image shapes: equal up to the order of one float addition
    assert [float(r["loss"]) for r in two] == pytest.approx([float(r["loss"]) for r in reference], rel=1e-5)
    seed_everything(smoke_config(*SETTINGS).train.seed)
    start = build_model(smoke_config(*SETTINGS).model, 4).state_dict()
    w_two, w_one = weights(tmp_path / "two"), weights(tmp_path / "one" / "out")
    assert distance(w_one, start) > 0.1
    assert distance(w_two, w_one) < 1e-4 * distance(w_one, start)
