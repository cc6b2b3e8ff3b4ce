"""Checkpoints and model files: weights-only loading, exact RNG round trips, pruning, S3; resuming only
from a readable checkpoint of the run's own fingerprint, and the sweep after a killed write."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.data_smoke import ROOT, smoke_config, smoke_data  # noqa: F401  (fixture)
from tasn import checkpoint, storage
from tasn.cli import main as cli_main
from tasn.config import Config, ConfigError
from tasn.errors import TASNError
from tasn.model import build_model
from tasn.training import train
from tasn.training.outputs import CHECKPOINTS, MODEL


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _tiny_state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "epoch": 0, "step": step,
            "rng": checkpoint.rng_state()}


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    uri = checkpoint.save_checkpoint(_tiny_state(7), str(tmp_path), 7)
    expected = _draws()  # what comes next after the saved state
    _draws()  # move on
    state = torch.load(uri, map_location="cpu", weights_only=True)  # the safe loader, directly
    checkpoint.set_rng_state(state["rng"])
    assert _draws() == expected


def test_keeps_the_newest_and_ignores_temporary_files(tmp_path):
    for step in (3, 10, 25):
        checkpoint.save_checkpoint(_tiny_state(step), str(tmp_path), step, keep=2)
    (tmp_path / ".ckpt-000000099.pt.x.tmp").write_bytes(b"half a file")  # an interrupted write
    names = [u.rsplit("/", 1)[-1] for u in checkpoint.list_checkpoints(str(tmp_path))]
    assert names == ["ckpt-000000010.pt", "ckpt-000000025.pt"]
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(tmp_path)))["step"] == 25
    assert checkpoint.latest_checkpoint(str(tmp_path / "none")) is None


def test_a_foreign_file_is_named_in_the_error(tmp_path):
    bad = tmp_path / "ckpt-000000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="ckpt-000000001.pt"):
        checkpoint.load_checkpoint(str(bad))


@pytest.mark.parametrize("kind", ["baseline", "tasn"])
def test_model_file_rebuilds_the_same_network(tmp_path, kind):
    cfg = Config()
    cfg.model.kind, cfg.model.backbone, cfg.model.att_backbone = kind, "resnet18-slim", "resnet18-slim"
    cfg.model.att_head_channels, cfg.model.att_size, cfg.model.out_size = 16, 32, 32
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    path = checkpoint.save_model(str(tmp_path / MODEL), model, cfg.to_dict(), ["a", "b", "c"])
    loaded, meta = checkpoint.load_model(path)
    assert meta["classes"] == ["a", "b", "c"] and meta["kind"] == kind
    assert meta["config"]["model"]["att_size"] == 32
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(getattr(model(x), model.primary_head), getattr(loaded(x), loaded.primary_head))


def test_a_model_file_from_before_a_key_existed_rebuilds_as_it_was_trained(tmp_path):
    """Every TASN recorded without `model.att_stride` ran at the authors' stride 8, and without the
    map powers at theirs (structure squared, detail not): the file must not come back at today's
    defaults (its weights would load, its maps or its zoom would not be theirs)."""
    cfg = Config()
    cfg.model.att_head_channels, cfg.model.att_size, cfg.model.out_size = 16, 64, 32
    cfg.model.att_stride, cfg.model.structure_power, cfg.model.detail_power = 8, 2.0, 1.0
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    old = cfg.to_dict()
    for key in ("att_stride", "structure_power", "detail_power"):
        del old["model"][key]
    path = checkpoint.save_model(str(tmp_path / MODEL), model, old, ["a", "b", "c"])
    loaded, meta = checkpoint.load_model(path)
    recorded = meta["config"]["model"]
    assert (recorded["att_stride"], recorded["structure_power"], recorded["detail_power"]) == (8, 2.0, 1.0)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert loaded.attention_net(x)[1].shape[-1] == 96 // 8
        assert (loaded.structure_power, loaded.detail_power) == (2.0, 1.0)
        assert torch.equal(model(x).master_aux, loaded(x).master_aux)


@pytest.mark.integration
def test_checkpoints_to_and_from_s3(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket()
    prefix = f"s3://{bucket}/runs/a/checkpoints"
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(_tiny_state(step), prefix, step, keep=2)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["runs/a/checkpoints/ckpt-000000002.pt", "runs/a/checkpoints/ckpt-000000003.pt"]
    latest = checkpoint.latest_checkpoint(prefix)
    assert latest == f"{prefix}/ckpt-000000003.pt"
    assert torch.equal(checkpoint.load_checkpoint(latest)["model"]["w"], torch.full((2,), 3.0))
    assert storage.exists(latest) and not storage.exists(f"{prefix}/ckpt-000000001.pt")
    with pytest.raises(FileNotFoundError, match="ckpt-000000009"):
        storage.read_bytes(f"{prefix}/ckpt-000000009.pt")
    assert checkpoint.latest_checkpoint(f"s3://{bucket}/elsewhere") is None


# -- resuming: the newest readable checkpoint, of this run's own fingerprint ---------------------

def test_auto_resume_skips_an_unreadable_newest_checkpoint_naming_it(tmp_path, caplog):
    for step in (3, 10, 25):
        checkpoint.save_checkpoint(_tiny_state(step), str(tmp_path), step, keep=0)
    newest = tmp_path / checkpoint.checkpoint_name(25)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated: a full disk, a kill of a non-atomic copy
    with caplog.at_level(logging.WARNING, logger="tasn.checkpoint"):
        uri, state = checkpoint.resume_source("auto", str(tmp_path))
    assert uri == str(tmp_path / checkpoint.checkpoint_name(10)) and state["step"] == 10
    assert f"skipping checkpoint {newest}" in caplog.text
    (tmp_path / checkpoint.checkpoint_name(10)).write_bytes(b"junk")
    (tmp_path / checkpoint.checkpoint_name(3)).write_bytes(b"")
    assert checkpoint.resume_source("auto", str(tmp_path)) is None  # nothing readable: start afresh
    assert checkpoint.resume_source("never", str(tmp_path)) is None


def test_an_explicit_unreadable_or_missing_checkpoint_is_an_error_naming_it(tmp_path):
    bad = tmp_path / checkpoint.checkpoint_name(1)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TASNError, match=rf"--resume {bad}: .*not a readable checkpoint"):
        checkpoint.resume_source(str(bad), str(tmp_path))
    with pytest.raises(TASNError, match="no checkpoint there"):
        checkpoint.resume_source(str(tmp_path / "nothing.pt"), str(tmp_path))


def test_the_fingerprint_covers_weights_inputs_and_ignores_how_the_run_is_steered():
    base = checkpoint.fingerprint(Config(), "abc.dir")
    assert base[checkpoint.DATA_VERSION] == "abc.dir"
    for key, value in (("train.lr", 0.2), ("model.backbone", "resnet50"), ("loss.w_distill", 0.5),
                       ("preprocess.size", 320), ("train.epochs", 3)):
        cfg = Config()
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        assert [d.split(" ")[0] for d in checkpoint.differences(base, checkpoint.fingerprint(cfg, "abc.dir"))] \
            == [key]
    steered = Config()
    steered.train.checkpoint_dir, steered.train.keep_checkpoints, steered.train.log_every = "s3://b/x", 9, 1
    steered.train.resume, steered.train.force_resume, steered.train.max_steps = "never", True, 5
    steered.evaluate.batch_size, steered.tracking.uri, steered.validate.min_side = 3, "http://m", 7
    assert checkpoint.fingerprint(steered, "abc.dir") == base
    assert checkpoint.differences(base, checkpoint.fingerprint(Config(), "other.dir")) == [
        "data.version ('abc.dir' -> 'other.dir')"]


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys_unless_forced():
    mine, cfg = checkpoint.fingerprint(Config(), "d1"), Config()
    cfg.train.lr, cfg.model.att_size = 0.2, 64
    theirs = checkpoint.fingerprint(cfg, "d2")
    with pytest.raises(ConfigError) as err:
        checkpoint.check_fingerprint("ckpt-000000004.pt", {"fingerprint": theirs}, mine, force=False)
    text = str(err.value)
    for needle in ("ckpt-000000004.pt", "train.lr (0.2 -> 0.1)", "model.att_size (64 -> 168)",
                   "data.version ('d2' -> 'd1')", "train.resume=never", "train.force_resume=true"):
        assert needle in text, needle
    assert "train.epochs" not in text
    assert checkpoint.check_fingerprint("c", {"fingerprint": dict(mine)}, mine, force=False) == []
    assert len(checkpoint.check_fingerprint("c", {"fingerprint": theirs}, mine, force=True)) == 3
    with pytest.raises(ConfigError, match="has no fingerprint"):
        checkpoint.check_fingerprint("old.pt", {"model": {}}, mine, force=False)


def test_sweep_removes_only_what_killed_checkpoint_writes_left(tmp_path):
    keep = ["ckpt-000000002.pt", "notes.txt", ".hidden", ".ckpt-000000002.pt"]
    for name in [*keep, ".ckpt-000000003.pt.k2j4.tmp", ".ckpt-000000004.pt.zz.tmp"]:
        (tmp_path / name).write_bytes(b"x")
    removed = checkpoint.sweep_temporaries(str(tmp_path))
    assert [Path(p).name for p in removed] == [".ckpt-000000003.pt.k2j4.tmp", ".ckpt-000000004.pt.zz.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert checkpoint.sweep_temporaries(str(tmp_path / "absent")) == []
    assert checkpoint.sweep_temporaries("s3://bucket/run/checkpoints") == []


def _train_cli(out: Path, data: Path, *overrides: str) -> int:
    args = ["train", "--data", str(data), "--out", str(out), "--params", str(ROOT / "params.yaml"),
            "--profile", "smoke"]
    for item in ("tracking.enabled=false", "train.picture_images=0", "train.max_steps=2", *overrides):
        args += ["-S", item]
    return cli_main(args)


def test_a_rerun_into_the_same_out_with_another_config_is_refused(smoke_data, tmp_path, capsys, caplog):  # noqa: F811
    """The plain CLI: before fingerprints, this rerun trained nothing and wrote the new lr into model.pt.
    Now it is refused naming the key, and destroys nothing."""
    out = tmp_path / "train"
    assert _train_cli(out, smoke_data) == 0
    model = (out / MODEL).read_bytes()
    capsys.readouterr()
    assert _train_cli(out, smoke_data, "train.lr=0.2") == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert "was written by a run of another config or data" in err and "train.lr (0.1 -> 0.2)" in err
    assert (out / MODEL).read_bytes() == model  # nothing already produced is touched
    assert _train_cli(out, smoke_data, "train.max_steps=3") == 0  # a steering key: resumes and goes on
    assert torch.load(out / MODEL, weights_only=True)["steps"] == 3
    with caplog.at_level(logging.WARNING, logger="tasn.training.stage"):
        assert _train_cli(out, smoke_data, "train.lr=0.2", "train.force_resume=true") == 0
    assert "train.force_resume: continuing" in caplog.text and "train.lr (0.1 -> 0.2)" in caplog.text


KILLED_WRITE = textwrap.dedent('''
    """Train with a checkpoint every step; hang inside the write of the step-2 checkpoint (after its
    bytes reached the temporary file, before the rename) until the test SIGKILLs this process."""
    import os, sys, time
    from pathlib import Path
    import tasn.io
    from fixtures.data_smoke import smoke_config
    from tasn.training import train

    real_fsync, marker = os.fsync, Path(sys.argv[3])
    def fsync(fd):
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".ckpt-000000002.pt."):
            marker.write_text("in the write")
            time.sleep(600)
    tasn.io.os.fsync = fsync
    train(smoke_config(*sys.argv[4:]), sys.argv[1], sys.argv[2])
''')


@pytest.mark.slow
def test_a_killed_checkpoint_write_is_swept_and_the_next_run_resumes(smoke_data, tmp_path, caplog):  # noqa: F811
    overrides = ["tracking.enabled=false", "train.picture_images=0", "train.checkpoint_every=1", "train.epochs=2"]
    out, marker = tmp_path / "train", tmp_path / "marker"
    script = tmp_path / "killed_write.py"
    script.write_text(KILLED_WRITE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, str(script), str(smoke_data), str(out), str(marker), *overrides],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    assert marker.exists(), err.decode()[-3000:]
    ckpts = out / CHECKPOINTS
    (temporary,) = [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # the half-written one
    assert temporary.startswith(".ckpt-000000002.pt.")
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".")] == [checkpoint.checkpoint_name(1)]

    with caplog.at_level(logging.INFO):
        result = train(smoke_config(*overrides), smoke_data, out)
    assert f"removed {ckpts / temporary}" in caplog.text
    assert f"resuming from {ckpts / checkpoint.checkpoint_name(1)}" in caplog.text
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert result.metrics["steps"] == 6 and result.metrics["epochs"] == 2  # 2 epochs x 3 steps, none lost
