"""The embedded default (Fashion-MNIST in clutter): layout, provenance, determinism, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from tasn.cli import main as cli_main
from tasn.config import ConfigError, FashionConfig
from tasn.data import fashion
from tasn.data.layout import check_layout, read_layout
from tasn.errors import DataError
from test_data_support import fake_fashion_source, idx_bytes


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path):
    return fake_fashion_source(tmp_path / "fmnist")


def small(source, **kw) -> FashionConfig:
    return FashionConfig(source=str(source), classes=["Shirt", "T-shirt_top", "Coat"], train_per_class=3,
                         test_per_class=2, side=112, item_min=28, item_max=30, **kw)


def test_read_idx_round_trips_and_rejects_other_files(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(idx_bytes(arr))
    assert np.array_equal(fashion.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="b.gz: not a readable gzip file"):
        fashion.read_idx(tmp_path / "b.gz")
    (tmp_path / "c.gz").write_bytes(idx_bytes(arr)[:-9])  # truncated: gzip fails or the size check does
    with pytest.raises(DataError, match="c.gz"):
        fashion.read_idx(tmp_path / "c.gz")


def test_writes_a_valid_cub_layout_with_licence_and_provenance(tmp_path, source):
    cfg = small(source)
    summary = fashion.generate(tmp_path / "raw", cfg, workers=1)
    root = tmp_path / "raw"
    layout = read_layout(root)
    check_layout(layout)
    assert layout.class_names() == ["001.Shirt", "002.T-shirt_top", "003.Coat"]
    assert summary["images"] == len(layout.images) == 3 * 5 and summary["train"] == 9
    for rel in layout.images["path"]:
        with Image.open(root / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (112, 112)
    assert "Zalando SE" in (root / fashion.LICENSE_FILE).read_text()
    assert (root / "contact_sheet.png").stat().st_size > 1000
    # train garments come from Fashion-MNIST's training file, test garments from its test file,
    # each of the right Fashion-MNIST label
    origin = json.loads((root / "fashion.json").read_text())["images_origin"]
    split = dict(zip(layout.images["path"], layout.images["is_train"]))
    labels = {s: fashion.load_split(source, s)[1] for s in ("train", "test")}
    for entry in origin:
        fm_split, index = entry["fashion_mnist"].rstrip("]").split("[")
        assert fm_split == ("train" if split[entry["path"]] else "test")
        assert fashion.LABELS[labels[fm_split][int(index)]] == entry["path"].split("/")[0].split(".", 1)[1]


def test_is_deterministic_across_worker_counts_and_follows_the_seed(tmp_path, source):
    cfg = small(source)
    fashion.generate(tmp_path / "a", cfg, workers=1)
    fashion.generate(tmp_path / "b", cfg, workers=2)
    fashion.generate(tmp_path / "c", dataclasses.replace(cfg, seed=1), workers=1)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a["images.txt"] == c["images.txt"] and a != c


def test_the_garment_is_small_on_its_card_and_only_it_carries_the_class(source):
    """Same scene, two garments of different labels: the canvases differ only inside the card,
    which covers a few percent of the canvas."""
    images, _ = fashion.load_split(source, "train")
    a, box = fashion.render(5, 7, images[0], 192, 28, 36)
    b, box_b = fashion.render(5, 7, images[-1], 192, 28, 36)
    assert box == box_b
    changed = np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 30
    ys, xs = np.nonzero(changed)
    assert len(ys) > 0
    assert (np.abs(xs - box.cx) <= box.half + 1).all() and (np.abs(ys - box.cy) <= box.half + 1).all()
    assert (2 * box.half) ** 2 / 192**2 < 0.1


@pytest.mark.parametrize("change,match", [
    ({"classes": ["Shirt", "Sock"]}, r"data.fashion.classes\[1\]: 'Sock' is not one of T-shirt_top, Trouser"),
    ({"classes": ["Shirt", "Shirt"]}, "data.fashion.classes: need at least 2 distinct names"),
    ({"train_per_class": 5}, "data.fashion.train_per_class: 5 is more than the 4 Shirt images"),
    ({"train_per_class": 0}, "data.fashion.train_per_class: must be >= 1"),
    ({"item_min": 31}, r"data.fashion.item_min \(31\) is larger than item_max \(30\)"),
    ({"side": 80}, "data.fashion.side: 80 px is too small"),
])
def test_bad_settings_are_named(tmp_path, source, change, match):
    with pytest.raises(ConfigError, match=match):
        fashion.generate(tmp_path / "raw", dataclasses.replace(small(source), **change), workers=1)
    assert not (tmp_path / "raw").exists()


def test_cli_generates_and_a_missing_source_is_a_clear_error(tmp_path, source, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data: {}\n")  # the defaults
    rc = cli_main(["data", "fashion", str(tmp_path / "raw"), "--params", str(params), "--workers", "1",
                   "-S", f"data.fashion.source={source}", "-S", "data.fashion.train_per_class=2",
                   "-S", "data.fashion.test_per_class=1"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["images"] == 30
    rc = cli_main(["data", "fashion", str(tmp_path / "other"), "--params", str(params),
                   "-S", f"data.fashion.source={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()
