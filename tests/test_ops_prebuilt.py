"""Which ahead-of-time library `tasn.ops` trusts (tasn/ops/build.py `find_prebuilt`).

The CUDA image compiles the fused sampler at build time for sm_80 and sm_90 and has no nvcc at run
time, so a prebuilt library must be trusted for what it was built from and for: these sources, this
torch and CUDA version, and the visible GPU's architecture; never for whether a compiler is here.
No compiler runs in these tests: `find_prebuilt` reads the stamp beside the library, and the library
file itself is a stand-in (the image test loads the real one: tests/test_image.py).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tasn.ops import build


def prebuilt(tmp_path, monkeypatch, with_cuda=True, arch="8.0;9.0", **changes):
    """A library and its stamp as `python -m tasn.ops.build --arch ARCH` leaves them, for a CUDA 13.0
    build of this torch (as in the image), with `changes` to its fingerprint."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    folder = tmp_path / "prebuilt"
    folder.mkdir()
    lib = folder / f"{build.NAME}.so"
    lib.write_bytes(b"\x7fELF stand-in")
    made = {**build.fingerprint(with_cuda), **changes}
    (folder / build.STAMP).write_text(json.dumps({"build": made, "arch": arch if with_cuda else None}))
    monkeypatch.setenv("TASN_OPS_PREBUILT", str(folder))
    return lib


def no_compiler(monkeypatch):
    monkeypatch.setattr(build, "cuda_home", lambda: None)
    monkeypatch.setenv("PATH", "/nonexistent")


def gpus(monkeypatch, *capabilities):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])


def test_a_cuda_build_is_used_where_no_compiler_is(tmp_path, monkeypatch):
    """The runtime image: the library was compiled with CUDA kernels elsewhere; here is no nvcc."""
    lib = prebuilt(tmp_path, monkeypatch)
    no_compiler(monkeypatch)
    gpus(monkeypatch)
    assert build.with_cuda() is False
    assert build.find_prebuilt(build.with_cuda()) == lib


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0)])
def test_a_cuda_build_is_used_on_the_gpus_it_was_compiled_for(tmp_path, monkeypatch, capability):
    lib = prebuilt(tmp_path, monkeypatch)
    no_compiler(monkeypatch)
    gpus(monkeypatch, capability)
    assert build.find_prebuilt(False) == lib


@pytest.mark.parametrize("capability", [(7, 5), (10, 0), (12, 0)])
def test_a_cuda_build_gives_way_on_a_gpu_it_has_no_code_for(tmp_path, monkeypatch, caplog, capability):
    prebuilt(tmp_path, monkeypatch)
    gpus(monkeypatch, (9, 0), capability)  # one GPU it cannot run on is enough
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.find_prebuilt(False) is None
    assert f"GPU 1 is sm_{capability[0]}{capability[1]}" in caplog.text and "8.0;9.0" in caplog.text


@pytest.mark.parametrize("key", ["sources_sha256", "torch", "torch_cuda", "name"])
def test_a_build_from_other_sources_or_for_another_torch_is_ignored(tmp_path, monkeypatch, caplog, key):
    prebuilt(tmp_path, monkeypatch, **{key: "something else"})
    no_compiler(monkeypatch)
    gpus(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.find_prebuilt(False) is None
    assert f"built for another {key} ('something else'" in caplog.text


def test_a_cpu_only_build_gives_way_to_a_toolkit_and_serves_without_one(tmp_path, monkeypatch):
    lib = prebuilt(tmp_path, monkeypatch, with_cuda=False)
    gpus(monkeypatch)
    assert build.find_prebuilt(cuda=True) is None
    assert build.find_prebuilt(cuda=False) == lib


def test_an_unreadable_stamp_is_ignored_with_its_reason(tmp_path, monkeypatch, caplog):
    lib = prebuilt(tmp_path, monkeypatch)
    (lib.parent / build.STAMP).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        assert build.find_prebuilt(False) is None
    assert "unreadable" in caplog.text


@pytest.mark.parametrize(("arch", "capability", "runs"), [
    ("8.0;9.0", (8, 0), True),
    ("8.0;9.0", (8, 6), True),      # sm_80 machine code runs on later minors of Ampere
    ("8.6", (8, 0), False),         # not on earlier ones
    ("8.0;9.0", (10, 0), False),    # nor on another major version
    ("9.0+PTX", (10, 0), True),     # PTX is compiled by the driver for newer GPUs
    ("9.0+PTX", (8, 0), False),
    ("9.0a", (9, 0), True),         # architecture-specific code: that architecture only
    ("9.0a", (9, 1), False),
    ("8.0 9.0", (9, 0), True),      # torch also accepts spaces
    (None, (9, 0), False),
    ("", (9, 0), False),
])
def test_arch_covers(arch, capability, runs):
    assert build.arch_covers(arch, capability) is runs
