"""The project's images as pods run them (marker `image`: `make test-image`, after `make image`).

- the CPU image: entry point `tasn`, uid 10001, the commit inside (TASN_GIT_COMMIT and the OCI
  revision label), and `tasn data synth --profile smoke /work/raw` on a read-only root with only
  its volumes writable, the profile found beside the image's params file;
- the CUDA image (when `make image-gpu` built it): the fused op compiled at build time is loaded
  from the prebuilt library, with its CUDA kernels, where no nvcc exists, on this GPU-less machine.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import yaml

from fixtures.images import files_under, head_commit
from fixtures.pods import ROOT, EmptyDir, Pod, Podman, podman

pytestmark = pytest.mark.image


def config(image: str) -> dict:
    return yaml.safe_load(podman("image", "inspect", image))[0]["Config"]


def test_the_image_carries_its_entry_point_user_and_commit(cpu_image):
    cfg = config(cpu_image)
    assert cfg["Entrypoint"] == ["tasn"]
    assert cfg["User"] == "10001:10001"
    assert cfg["WorkingDir"] == "/workspace"
    env = dict(item.split("=", 1) for item in cfg["Env"])
    assert env["TASN_GIT_COMMIT"] == head_commit() == cfg["Labels"]["org.opencontainers.image.revision"]
    assert env["TASN_PARAMS"] == "/etc/tasn/params.yaml"
    assert cfg["Labels"]["org.opencontainers.image.title"] == "tasn-cpu"


def test_synth_with_the_images_profile_as_uid_10001_on_a_read_only_root(cpu_image, tmp_path):
    """The issue's command, as a pod with a /work volume and a /tmp volume and nothing else writable."""
    pods = Podman(tmp_path / "pods")
    work = tmp_path / "work"
    pod = Pod(name=f"synth-{os.getpid()}", image=cpu_image, args=["data", "synth", "--profile", "smoke", "/work/raw"],
              empty_dirs={"/work": EmptyDir(), "/tmp": EmptyDir()}, prepared={"/work": work})
    done = pods.run(pod)
    assert done.code == 0, done.log[-3000:]
    smoke = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())["data"]["synth"]
    images = [p for p in files_under(work / "raw" / "images") if p.suffix == ".jpg"]
    per_class = smoke["train_per_class"] + smoke["test_per_class"]
    assert len(images) == smoke["classes"] * per_class, f"{len(images)} images: not the smoke profile's"
    assert {p.stat().st_uid for p in files_under(work)} == {10001}

    probe = Pod(name=f"probe-{os.getpid()}", image=cpu_image, command=["sh", "-c"],
                args=["id -u; touch /workspace/x /home/tasn/x 2>&1; touch /tmp/x && echo tmp-ok"],
                empty_dirs={"/tmp": EmptyDir()})
    out = pods.run(probe)
    lines = out.log.splitlines()
    assert lines[0] == "10001", out.log
    assert sum("Read-only file system" in line for line in lines) == 2, out.log  # even where 10001 owns
    assert lines[-1] == "tmp-ok", out.log


def test_the_cuda_image_loads_its_prebuilt_op_without_nvcc(cuda_image, tmp_path):
    """`make image-gpu`'s own check (scripts/image.py CUDA_CHECK), on a read-only root, no GPU here."""
    spec = importlib.util.spec_from_file_location("image_script", ROOT / "scripts" / "image.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    out = Podman(tmp_path).run(Pod(name=f"cuda-{os.getpid()}", image=cuda_image, command=["python", "-c"],
                                   args=[script.CUDA_CHECK]))
    assert out.code == 0, out.log[-3000:]
    assert "tasn ops: loaded prebuilt /opt/tasn-ops/tasn_ops.so" in out.log
    assert "kernels ['CPU', 'CUDA']" in out.log and "no nvcc" in out.log
