"""DVC: the embedded sample arrives through DVC on a fresh clone, and round-trips through S3 (Ceph RGW)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tasn.config import load_config
from tasn.data import synth
from tasn.data.layout import check_layout, read_layout
from test_data_support import tiny_synth

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))


def dvc(cwd: Path, *args: str, env: dict | None = None) -> str:
    res = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})})
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _clone(dest: Path) -> Path:
    """What a fresh clone holds of the data side: git repo, .dvc/config, data.dvc, the in-repo remote."""
    dest.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    (dest / ".dvc").mkdir()
    shutil.copyfile(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copyfile(REPO / "data.dvc", dest / "data.dvc")
    shutil.copytree(REPO / "dvc-storage", dest / "dvc-storage")
    return dest


def test_fresh_clone_pulls_the_embedded_sample_from_the_in_repo_remote(tmp_path):
    clone = _clone(tmp_path / "clone")
    dvc(clone, "pull", "-q")
    assert "up to date" in dvc(clone, "status", "data.dvc")
    raw = clone / "data" / "raw"
    layout = read_layout(raw)
    check_layout(layout)
    cfg = load_config(REPO / "params.yaml").data.synth
    assert len(layout.images) == cfg.classes * (cfg.train_per_class + cfg.test_per_class)
    assert len(layout.classes) == cfg.classes
    out = yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]
    assert out["path"] == "data/raw" and out["nfiles"] == sum(p.is_file() for p in raw.rglob("*"))
    # The sample is exactly `tasn data synth` with params.yaml's data.synth: re-render two images.
    per_class = cfg.train_per_class + cfg.test_per_class
    table = synth.class_table(cfg.classes)
    for index in (0, per_class * (cfg.classes - 1) + per_class - 1):
        label = index // per_class
        arr, _ = synth.render(cfg.seed, index, table[label], cfg.min_side, cfg.max_side)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=cfg.jpeg_quality)
        assert (raw / "images" / layout.images["path"].iloc[index]).read_bytes() == buf.getvalue()


@pytest.mark.integration
def test_dvc_push_and_pull_round_trip_through_ceph_rgw(s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    tiny_synth(repo / "data" / "raw")
    before = _digest(repo / "data" / "raw")
    dvc(repo, "add", "-q", "data/raw")
    dvc(repo, "remote", "add", "-d", "s3", f"s3://{bucket}/dvc")
    dvc(repo, "remote", "modify", "s3", "endpointurl", s3_server.endpoint)
    dvc(repo, "remote", "modify", "--local", "s3", "access_key_id", s3_server.access_key)
    dvc(repo, "remote", "modify", "--local", "s3", "secret_access_key", s3_server.secret_key)
    assert s3_server.secret_key not in (repo / ".dvc" / "config").read_text()  # keys stay out of git
    dvc(repo, "push", "-q")

    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="dvc/")
    keys = {o["Key"] for o in listed.get("Contents", [])}
    expected = {f"dvc/files/md5/{h[:2]}/{h[2:]}" for h in
                (hashlib.md5((repo / "data" / "raw" / rel).read_bytes()).hexdigest() for rel in before)}
    assert expected <= keys and len(keys) == len(expected) + 1  # every file, plus the .dir listing
    assert any(k.endswith(".dir") for k in keys)

    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull", "-q")
    assert _digest(repo / "data" / "raw") == before
