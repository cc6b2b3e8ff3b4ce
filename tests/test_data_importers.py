"""Importers: a CUB-200-2011-shaped tree and a folder per class, through validate and preprocess."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasn.cli import main
from tasn.data.importers import import_folder, stratified_split
from tasn.data.layout import check_layout, read_layout
from tasn.data.preprocess import CLASSES, MANIFEST
from test_data_support import make_cub_tree

PARAMS = "validate: {min_side: 32, workers: 1}\npreprocess: {size: 40, workers: 1}\nmodel: {input_size: 32}\n"


def test_cub_tree_imports_validates_and_preprocesses_ignoring_boxes(tmp_path, capsys):
    src = make_cub_tree(tmp_path / "download" / "CUB_200_2011")
    (tmp_path / "params.yaml").write_text(PARAMS)
    params = ["--params", str(tmp_path / "params.yaml")]
    dest = tmp_path / "raw"
    assert main(["data", "import-cub", str(tmp_path / "download"), str(dest), "--workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["classes"], summary["train"], summary["test"]) == (15, 3, 9, 6)
    assert not (dest / "bounding_boxes.txt").exists() and not (dest / "parts").exists()
    for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        assert (dest / name).read_text() == (src / name).read_text()
    layout = read_layout(dest)
    check_layout(layout)
    for rel in layout.images["path"]:
        assert (dest / "images" / rel).read_bytes() == (src / "images" / rel).read_bytes()

    assert main(["validate", *params, "--data", str(dest), "--report-dir", str(tmp_path / "report")]) == 0
    assert main(["preprocess", *params, "--data", str(dest), "--out", str(tmp_path / "prep")]) == 0
    m = pd.read_parquet(tmp_path / "prep" / MANIFEST)
    assert len(m) == 15 and (m[["width", "height"]].min(axis=1) == 40).all()
    assert json.loads((tmp_path / "prep" / CLASSES).read_text())[0] == "001.Black_footed_Albatross"


def test_import_cub_refuses_a_broken_tree_and_keeps_dest(tmp_path, capsys):
    src = make_cub_tree(tmp_path / "cub")
    dest = tmp_path / "raw"
    assert main(["data", "import-cub", str(src), str(dest), "--workers", "1"]) == 0
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    bad = src / "images" / (src / "images.txt").read_text().split()[1]
    bad.write_bytes(bad.read_bytes()[:200])
    assert main(["data", "import-cub", str(src), str(dest), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated or corrupt" in err
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert main(["data", "import-cub", str(tmp_path), str(dest)]) == 1
    assert "not a CUB-200-2011 folder" in capsys.readouterr().err


def _folder_tree(root, counts, rng):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for k in range(n):
            arr = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"img {k}.png")
        (root / name / "notes.txt").write_text("not an image: skipped by suffix\n")
    return root


def test_import_folder_makes_a_seeded_stratified_split(tmp_path):
    src = _folder_tree(tmp_path / "src", {"house sparrow": 8, "robin": 4, "wren": 5}, np.random.default_rng(0))
    summary = import_folder(src, tmp_path / "a", test_fraction=0.25, seed=7, workers=1)
    assert (summary["images"], summary["classes"]) == (17, 3)
    layout = read_layout(tmp_path / "a")
    check_layout(layout)
    assert layout.class_names() == ["house_sparrow", "robin", "wren"]
    per_class_test = layout.images[~layout.images.is_train.astype(bool)].groupby("class_id").size().to_dict()
    assert per_class_test == {1: 2, 2: 1, 3: 1}  # round(n / 4), at least one
    import_folder(src, tmp_path / "b", test_fraction=0.25, seed=7, workers=1)
    import_folder(src, tmp_path / "c", test_fraction=0.25, seed=8, workers=1)
    split = lambda d: (d / "train_test_split.txt").read_text()  # noqa: E731
    assert split(tmp_path / "a") == split(tmp_path / "b") != split(tmp_path / "c")
    assert (tmp_path / "a" / "images" / "house_sparrow" / "img_0.png").is_file()


def test_import_folder_rejects_bad_input_and_keeps_dest(tmp_path, capsys):
    src = _folder_tree(tmp_path / "src", {"a": 3, "b": 3}, np.random.default_rng(1))
    dest = tmp_path / "raw"
    assert main(["data", "import-folder", str(src), str(dest), "--workers", "1"]) == 0
    before = (dest / "images.txt").read_text()
    (src / "b" / "img 1.png").write_text("text, not a PNG")
    assert main(["data", "import-folder", str(src), str(dest), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{src / 'b' / 'img 1.png'}: not an image" in err
    (src / "b" / "img 1.png").unlink()
    (src / "b" / "img 2.png").unlink()
    assert main(["data", "import-folder", str(src), str(dest), "--workers", "1"]) == 1
    assert f"{src / 'b'}: class has 1 image(s); needs at least 2" in capsys.readouterr().err
    assert (dest / "images.txt").read_text() == before


@pytest.mark.parametrize("n,fraction,expected", [(2, 0.5, 1), (10, 0.25, 2), (3, 0.01, 1), (4, 0.99, 3)])
def test_stratified_split_keeps_both_splits(n, fraction, expected):
    flags = stratified_split(n, fraction, np.random.default_rng(0))
    assert len(flags) == n and flags.count(False) == expected
