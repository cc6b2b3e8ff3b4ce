"""DVC: the embedded default arrives through DVC on a fresh clone (and reads without DVC), and
round-trips through S3 (Ceph RGW)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tasn.config import load_config
from tasn.data import fashion
from tasn.data.dvc_remote import listing as dvc_listing
from tasn.data.dvc_remote import materialize
from tasn.data.layout import check_layout, read_layout
from tasn.errors import DataError
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


def test_fresh_clone_pulls_the_embedded_default_from_the_in_repo_remote(tmp_path):
    clone = _clone(tmp_path / "clone")
    dvc(clone, "pull", "-q")
    assert "up to date" in dvc(clone, "status", "data.dvc")
    raw = clone / "data" / "raw"
    layout = read_layout(raw)
    check_layout(layout)
    cfg = load_config(REPO / "params.yaml").data.fashion
    assert len(layout.images) == len(cfg.classes) * (cfg.train_per_class + cfg.test_per_class)
    assert layout.class_names() == [f"{k + 1:03d}.{c}" for k, c in enumerate(cfg.classes)]
    assert (raw / fashion.LICENSE_FILE).read_text() == fashion.LICENSE
    out = yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]
    assert out["path"] == "data/raw" and out["nfiles"] == sum(p.is_file() for p in raw.rglob("*"))
    # Read without DVC (what the details benchmark does on a GPU host): the same files, byte for byte.
    assert _digest(materialize(clone / "data.dvc", clone / "dvc-storage", tmp_path / "direct")) == _digest(raw)


def test_the_embedded_default_is_exactly_tasn_data_fashion_of_params_yaml():
    """Re-render canvases from the garments `fashion.json` records, with Debian's Fashion-MNIST
    (installed by `make test`'s system-deps) and params.yaml's data.fashion."""
    cfg = load_config(REPO / "params.yaml").data.fashion
    if not Path(cfg.source).is_dir():
        pytest.skip(f"{cfg.source} missing: apt-get install dataset-fashion-mnist (make system-deps)")
    direct = REPO / "dvc-storage"
    listing = {e["relpath"]: e["md5"] for e in dvc_listing(REPO / "data.dvc", direct)}

    def stored(rel: str) -> bytes:
        md5 = listing[rel]
        return (direct / "files" / "md5" / md5[:2] / md5[2:]).read_bytes()

    origin = json.loads(stored("fashion.json"))["images_origin"]
    splits = {s: fashion.load_split(Path(cfg.source), s)[0] for s in ("train", "test")}
    for index in (0, len(origin) - 1):
        split, i = origin[index]["fashion_mnist"].rstrip("]").split("[")
        arr, _ = fashion.render(cfg.seed, index, splits[split][int(i)], cfg.side, cfg.item_min, cfg.item_max)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=cfg.jpeg_quality)
        assert stored("images/" + origin[index]["path"]) == buf.getvalue()


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


def _fake_remote(root: Path, relpaths: list[str]) -> Path:
    """A DVC remote holding one tracked folder whose files are `relpaths` (each holding its own name)."""
    def put(data: bytes, suffix: str = "") -> str:
        md5 = hashlib.md5(data).hexdigest() + suffix
        obj = root / "remote" / "files" / "md5" / md5[:2] / md5[2:]
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)
        return md5

    entries = [{"md5": put(rel.encode()), "relpath": rel} for rel in relpaths]
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": put(json.dumps(entries).encode(), ".dir")}]}))
    return root / "remote"


def test_materialize_copies_inside_dest_and_refuses_a_listing_that_leads_out(tmp_path):
    remote = _fake_remote(tmp_path, ["images/a.txt"])
    out = materialize(tmp_path / "data.dvc", remote, tmp_path / "out")
    copied = out / "images" / "a.txt"
    assert copied.read_text() == "images/a.txt" and copied.stat().st_nlink == 1  # a copy: the remote stays as it is
    for bad in ("../escape.txt", "/abs.txt", "images/../../escape.txt"):
        remote = _fake_remote(tmp_path / bad.replace("/", "_"), ["images/ok.txt", bad])
        with pytest.raises(DataError, match="data.dvc: path"):
            materialize(remote.parent / "data.dvc", remote, remote.parent / "dest")
        assert not (remote.parent / "escape.txt").exists() and not Path("/abs.txt").exists()
