"""Checkpoints and model files: weights-only loading, exact RNG round trips, pruning, S3."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tasn import checkpoint, storage
from tasn.config import Config
from tasn.model import build_model
from tasn.training.outputs import MODEL


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
