"""Details sets (`tasn data details`): layout, determinism, and cues of the size, period and kind asked for."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from tasn.cli import main as cli_main
from tasn.config import ConfigError, DetailsConfig
from tasn.data import details
from tasn.data.fashion import clutter
from tasn.data.images import write_jpeg
from tasn.data.layout import check_layout, read_layout

TINY = DetailsConfig(classes=4, train_per_class=2, test_per_class=1, side=96, period=4.0, part_share=0.1, seed=5)


def test_the_command_writes_a_valid_cub_layout_each_image_a_pure_function_of_seed_index_class(tmp_path, capsys):
    argv = ["data", "details", "-S", "data.details.classes=6", "-S", "data.details.cue=shape", "-S",
            "data.details.train_per_class=2", "-S", "data.details.test_per_class=1", "-S", "data.details.side=96",
            "-S", "data.details.seed=4", str(tmp_path / "a"), "--workers", "1"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    layout = read_layout(tmp_path / "a")
    check_layout(layout)
    assert layout.class_names() == ["001.Disc_stripes", "002.Square_stripes", "003.Disc_checker",
                                    "004.Square_checker", "005.Disc_dots", "006.Square_dots"]
    assert (summary["images"], summary["train"], summary["test"]) == (18, 12, 6)
    for cid, group in layout.images.groupby("class_id"):
        assert group["is_train"].tolist() == [True, True, False], cid
    # so the set is the same for any worker count: image k of class c is render(seed, c x per_class + k, c's cues)
    cfg = DetailsConfig(classes=6, cue="shape", train_per_class=2, test_per_class=1, side=96, seed=4)
    path = tmp_path / "a" / "images" / "004.Square_checker" / "test_0003.jpg"
    write_jpeg(tmp_path / "again.jpg", details.render(4, 3 * 3 + 2, "checker", "square", cfg)[0], cfg.jpeg_quality)
    assert path.read_bytes() == (tmp_path / "again.jpg").read_bytes()
    with Image.open(path) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 96))


def test_two_classes_at_one_index_differ_only_inside_the_part():
    cfg = dataclasses.replace(TINY, side=160, part_share=0.05)
    for index in range(3):
        a, box = details.render(1, index, "stripes", None, cfg)
        b, _ = details.render(1, index, "dots", None, cfg)
        changed = np.argwhere(np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 30)
        assert 0.2 * cfg.part_share < len(changed) / cfg.side**2 < 1.1 * cfg.part_share
        assert (np.hypot(changed[:, 1] - box.cx, changed[:, 0] - box.cy) < box.half).all()


@pytest.mark.parametrize("shape", [None, *details.SHAPES])
def test_every_outline_has_the_area_of_the_share_and_lies_within_its_extent(shape):
    r, stretch = 20.0, 1.15
    yy, xx = (g / 8 for g in np.mgrid[-480:480, -480:480].astype(np.float64))  # 1/8 px grid
    inside = details.outline(shape, xx, yy, r, stretch) < 0
    assert inside.sum() / 64 == pytest.approx(math.pi * r * r, rel=0.02)
    assert np.hypot(xx[inside], yy[inside]).max() <= details.extent(shape, r, stretch) + 0.2


@pytest.mark.parametrize("period", [2.5, 4.0, 7.0])
def test_stripes_repeat_at_the_period_asked_for(period):
    """The strongest frequency of the stripes is 1 / period (the FFT of a large stripe field)."""
    n = 256
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    t = details.texture("stripes", xx, yy, period, np.zeros((3, 2)))  # stripes across q = y
    spectrum = np.abs(np.fft.rfft(t.mean(axis=1) - t.mean()))
    assert np.argmax(spectrum) / n == pytest.approx(1 / period, abs=1.5 / n)
    assert 0.4 < t.mean() < 0.6


def test_every_texture_covers_about_half_and_textures_differ():
    yy, xx = np.mgrid[-40:40, -40:40].astype(np.float64)
    waves = np.array([[0.3, 1.0], [1.4, 2.0], [2.4, 0.5]])
    fields = {k: details.texture(k, xx, yy, 4.0, waves) for k in details.TEXTURES}
    for kind, t in fields.items():
        assert 0.3 < t.mean() < 0.7, kind
    for a in details.TEXTURES:
        for b in details.TEXTURES:
            if a < b:
                assert np.abs(fields[a] - fields[b]).mean() > 0.15, (a, b)


def test_the_cues_read_at_a_third_of_the_resolution_as_documented():
    """Averaged to a third, the `none` part is gone (a zero-mean modulation of the clutter), the card is not."""
    def third(arr):
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        return np.asarray(img.resize((arr.shape[1] // 3, arr.shape[0] // 3), Image.Resampling.BOX), np.float32)

    gaps = {}
    for cue in ("none", "card"):
        cfg = dataclasses.replace(TINY, side=192, part_share=0.08, period=3.0, cue=cue)
        img, box = details.render(2, 0, "checker", None, cfg)
        scene = clutter(np.random.default_rng([2, 0]), cfg.side)  # what the render starts from
        r = math.sqrt(cfg.part_share * cfg.side**2 / math.pi) / 3 * 0.6  # well inside the part, at a third
        cx, cy = box.cx / 3, box.cy / 3
        yy, xx = np.mgrid[0:cfg.side // 3, 0:cfg.side // 3]
        near = np.hypot(xx - cx, yy - cy) < r
        gaps[cue] = np.abs(third(img) - third(scene))[near].mean()
    assert gaps["none"] < 10 and gaps["card"] > 3 * gaps["none"], gaps


def test_classes_beyond_what_the_cue_can_tell_apart_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.details.classes: 9 is more than the 8 the 'card' cue can tell apart"):
        details.generate(tmp_path / "x", dataclasses.replace(TINY, classes=9), workers=1)
    assert len(details.class_table(dataclasses.replace(TINY, classes=32, cue="shape"))) == 32
    assert not (tmp_path / "x").exists()
