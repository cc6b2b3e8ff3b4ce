"""`tasn preprocess`: sizes, modes, EXIF, shards that decode back, determinism, atomicity."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasn.cli import main
from tasn.data.preprocess import CLASSES, MANIFEST, preprocess, shard_name
from test_data_support import TINY, TINY_PREP, make_cub_tree, tiny_synth


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("pp") / "raw")


def test_preprocess_resizes_shorter_side_and_packs_shards(raw, tmp_path):
    out = tmp_path / "prep"
    summary = preprocess(raw, out, TINY_PREP).summary
    n = TINY.classes * (TINY.train_per_class + TINY.test_per_class)
    assert summary["images"] == n and summary["classes"] == TINY.classes
    m = pd.read_parquet(out / MANIFEST)
    assert list(m["image_id"]) == list(range(1, n + 1))
    assert json.loads((out / CLASSES).read_text())[0] == "001.Striped_wing_Ringed_eye"
    images_txt = dict(line.split() for line in (raw / "images.txt").read_text().splitlines())
    for row in m.itertuples():
        assert images_txt[str(row.image_id)] == row.path
        with Image.open(raw / "images" / row.path) as src:
            w0, h0 = src.size
        data = (out / row.shard).read_bytes()[row.offset : row.offset + row.length]
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (row.width, row.height)
        assert min(img.size) == TINY_PREP.size
        assert abs(img.width / img.height - w0 / h0) < 0.03  # aspect kept
        assert row.label == int(row.path[:3]) - 1
        assert row.split == ("train" if int(row.path.rsplit("_", 1)[1][:4]) <= TINY.train_per_class else "test")


def test_preprocess_is_deterministic_and_idempotent(raw, tmp_path):
    preprocess(raw, tmp_path / "a", TINY_PREP)
    first = _digest(tmp_path / "a")
    preprocess(raw, tmp_path / "a", TINY_PREP)  # over its own previous output
    preprocess(raw, tmp_path / "b", dataclasses.replace(TINY_PREP, workers=2))
    assert _digest(tmp_path / "a") == first
    assert _digest(tmp_path / "b") == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def _save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def test_preprocess_converts_modes_and_applies_exif_orientation(tmp_path):
    """Grayscale, CMYK, RGBA, 16-bit and EXIF-rotated images are input to convert, not errors."""
    root = make_cub_tree(tmp_path / "cub", n_classes=2, train=2, test=1)
    images = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    rgb = Image.new("RGB", (80, 40), (200, 30, 30))
    rgb.paste((30, 30, 200), (0, 0, 40, 40))  # left half blue, right half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    cases = {
        "1": (Image.new("L", (60, 90), 128), {"format": "JPEG"}),
        "2": (Image.new("CMYK", (70, 70), (0, 255, 255, 0)), {"format": "JPEG"}),
        "3": (Image.new("RGBA", (70, 70), (0, 0, 0, 0)), {"format": "PNG"}),
        "4": (Image.fromarray(np.full((50, 70), 65535, np.uint16)), {"format": "PNG"}),
        "5": (rgb, {"format": "JPEG", "exif": exif, "quality": 95}),
    }
    for image_id, (img, kw) in cases.items():
        _save(root / "images" / images[image_id], img, **kw)  # suffix stays .jpg: content decides
    out = tmp_path / "prep"
    preprocess(root, out, TINY_PREP)
    m = pd.read_parquet(out / MANIFEST).set_index("image_id")

    def pixels(image_id):
        row = m.loc[image_id]
        data = (out / row.shard).read_bytes()[row.offset : row.offset + row.length]
        return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)

    assert m.loc[1, "source_mode"] == "L" and np.abs(pixels(1) - 128).max() <= 3
    assert m.loc[2, "source_mode"] == "CMYK" and (pixels(2).mean(axis=(0, 1)) > [200, -1, -1]).all()
    assert pixels(2)[..., 1:].mean() < 40  # C=0, M=Y=255 is red
    assert m.loc[3, "source_mode"] == "RGBA" and pixels(3).min() >= 250  # transparent -> white
    assert m.loc[4, "source_mode"].startswith("I") and pixels(4).min() >= 250  # 16-bit white stays white
    p5 = pixels(5)
    assert (m.loc[5, "source_width"], m.loc[5, "source_height"]) == (80, 40)
    assert p5.shape[0] > p5.shape[1]  # portrait after applying the EXIF rotation
    top, bottom = p5[: p5.shape[0] // 4].mean(axis=(0, 1)), p5[-p5.shape[0] // 4 :].mean(axis=(0, 1))
    assert top[2] > top[0] and bottom[0] > bottom[2]  # rotated clockwise: blue (left) is now on top


def test_preprocess_cli_uses_params_and_reports_summary(raw, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("preprocess: {size: 48, jpeg_quality: 80, workers: 1}\nmodel: {input_size: 32}\n")
    rc = main(["preprocess", "--params", str(params), "--data", str(raw), "--out", str(tmp_path / "p")])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["size"] == 48
    assert min(Image.open(io.BytesIO((tmp_path / "p" / shard_name(0)).read_bytes())).size) == 48
