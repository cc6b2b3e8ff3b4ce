"""Where no container can run, `make test-image` builds nothing and every image test skips with the
reason; never a silent pass (cheap: part of `make test`, no container started)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from fixtures import images, pods
from fixtures.pods import ROOT


@pytest.fixture
def image_script():
    spec = importlib.util.spec_from_file_location("image_script", ROOT / "scripts" / "image.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_without_podman_and_without_root_the_build_says_what_is_missing_and_the_tests_skip(image_script, monkeypatch,
                                                                                          capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(image_script.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(pods.os, "geteuid", lambda: 1000)
    assert image_script.main(["cpu", "--if-possible"]) == 0
    out = capsys.readouterr().out
    assert "no image built: podman, runc, conmon, mmdebstrap not found, and installing needs root" in out
    with pytest.raises(SystemExit, match="apt-get install --no-install-recommends podman runc"):
        image_script.main(["cpu"])  # asked for explicitly, it fails
    with pytest.raises(pytest.skip.Exception, match="podman is not installed"):
        images.built_image("localhost/tasn:cpu")


def test_rootless_podman_without_user_namespaces_or_subordinate_ids_skips_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(pods.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("USER", "ci")
    real = pods._lines
    monkeypatch.setattr(pods, "_lines", lambda path: [] if path == "/etc/subuid" else real(path))
    reason = pods.unavailable()
    assert reason and "not root" in reason, reason
    assert ("user namespaces are off" in reason or "no subordinate uids" in reason), reason


def test_a_podman_that_cannot_run_is_a_skip_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(pods.os, "geteuid", lambda: 0)

    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 125, "", "Error: crun: cannot set up cgroups")

    monkeypatch.setattr(pods.subprocess, "run", failing)
    assert pods.unavailable() == "podman cannot run here: Error: crun: cannot set up cgroups"
