"""Lineage: the git commit with and without a checkout, the data version of a local folder (checked
against `dvc add` itself) and of an S3 prefix (against the Ceph RGW fixture), and the version the
preprocess stage records for train."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.data_smoke import smoke_data  # noqa: F401  (fixture)
from tasn import lineage
from tasn.data.preprocess import SUMMARY

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_git_commit_is_the_checkouts_head_else_the_images_build_arg(tmp_path, monkeypatch):
    if shutil.which("git") and (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        monkeypatch.setenv(lineage.GIT_COMMIT_ENV, COMMIT)
        assert lineage.git_commit(ROOT) == head  # a checkout wins over the environment
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above the pod-like folder
    monkeypatch.setenv(lineage.GIT_COMMIT_ENV, COMMIT)
    assert lineage.git_commit(tmp_path) == COMMIT  # a pod: no .git, the image's TASN_GIT_COMMIT
    for unknown in ("", "  "):
        monkeypatch.setenv(lineage.GIT_COMMIT_ENV, unknown)  # the build arg left empty
        assert lineage.git_commit(tmp_path) is None
    monkeypatch.delenv(lineage.GIT_COMMIT_ENV)
    assert lineage.git_commit(tmp_path) is None


def _tree(root: Path) -> Path:
    (root / "images" / "b").mkdir(parents=True)
    (root / "images.txt").write_text("1 b/1.jpg\n2 b/2.jpg\n")
    (root / "images" / "b" / "1.jpg").write_bytes(b"\xff\xd8one")
    (root / "images" / "b" / "2.jpg").write_bytes(b"\xff\xd8two" * 1000)
    (root / "classes.txt").write_text("1 b\n")
    return root


@pytest.mark.skipif(not Path(sys.executable).with_name("dvc").exists(), reason="dvc is not installed here")
def test_a_local_folders_version_is_the_md5_dvc_add_records(tmp_path):
    raw = _tree(tmp_path / "raw")
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (["init", "--no-scm", "-q"], ["add", "-q", "raw"]):
        subprocess.run([dvc, *args], cwd=tmp_path, env=env, check=True, capture_output=True)
    (out,) = yaml.safe_load((tmp_path / "raw.dvc").read_text())["outs"]
    assert lineage.data_version(raw) == out["md5"] and out["md5"].endswith(".dir")
    # the version follows the content: one changed byte, another version; a rename, another version
    (raw / "images" / "b" / "1.jpg").write_bytes(b"\xff\xd8One")
    changed = lineage.data_version(raw)
    assert changed != out["md5"]
    (raw / "images" / "b" / "1.jpg").rename(raw / "images" / "b" / "3.jpg")
    assert lineage.data_version(raw) not in (changed, out["md5"])


def test_nothing_there_has_no_version(tmp_path):
    assert lineage.data_version(tmp_path / "absent") is None
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert lineage.data_version(tmp_path / "empty") is None


def test_preprocess_records_the_raw_versions_for_train(smoke_data, tmp_path):  # noqa: F811
    recorded = lineage.recorded_data_version(smoke_data / SUMMARY)
    assert recorded == lineage.data_version(smoke_data.parent / "raw") and recorded.endswith(".dir")
    (tmp_path / SUMMARY).write_text(json.dumps({"images": 3}))  # prepared by an older tasn
    assert lineage.recorded_data_version(tmp_path / SUMMARY) is None
    assert lineage.recorded_data_version(tmp_path / "missing" / SUMMARY) is None
    (tmp_path / SUMMARY).write_text("not json")
    assert lineage.recorded_data_version(tmp_path / SUMMARY) is None


@pytest.mark.integration
def test_an_s3_prefix_version_digests_its_listing(s3_server, monkeypatch, tmp_path):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    raw = _tree(tmp_path / "raw")
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    for prefix in ("a/raw", "b/copy"):
        for path in files:
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(raw).as_posix()}", Body=path.read_bytes())
    first = lineage.data_version(f"s3://{bucket}/a/raw")
    assert first.startswith(lineage.LISTING_PREFIX)
    assert lineage.data_version(f"s3://{bucket}/b/copy/") == first  # the same objects under another prefix
    assert lineage.data_version(f"s3://{bucket}/a/ra") is None  # a prefix is a folder, not a string prefix
    s3.put_object(Bucket=bucket, Key="a/raw/images/b/1.jpg", Body=b"\xff\xd8One")  # same size, other bytes
    assert lineage.data_version(f"s3://{bucket}/a/raw") != first
    assert lineage.data_version(f"s3://{bucket}/nothing") is None
