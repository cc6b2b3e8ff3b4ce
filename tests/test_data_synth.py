"""The embedded sample: layout, determinism, and class cues that are fine-scale and small."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from PIL import Image

from tasn.config import ConfigError
from tasn.data import synth
from tasn.data.layout import check_layout, read_layout
from tasn.data.synth import generate
from test_data_support import TINY, tiny_synth


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_writes_a_valid_cub_layout(tmp_path):
    root = tiny_synth(tmp_path / "raw")
    layout = read_layout(root)
    check_layout(layout)
    per_class = TINY.train_per_class + TINY.test_per_class
    assert len(layout.images) == TINY.classes * per_class
    assert layout.class_names() == [
        "001.Striped_wing_Ringed_eye", "002.Checkered_wing_Ringed_eye",
        "003.Striped_wing_Rayed_eye", "004.Checkered_wing_Rayed_eye",
    ]
    for cid, group in layout.images.groupby("class_id"):
        assert group["is_train"].sum() == TINY.train_per_class, cid
    for rel in layout.images["path"]:
        with Image.open(root / "images" / rel) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert TINY.min_side <= min(im.size) and max(im.size) <= TINY.max_side
    assert (root / "contact_sheet.png").stat().st_size > 1000


def test_synth_is_deterministic_across_worker_counts(tmp_path):
    a = tiny_synth(tmp_path / "a")

    generate(tmp_path / "b", TINY, workers=2)
    assert _digest(a) == _digest(tmp_path / "b")
    generate(tmp_path / "c", dataclasses.replace(TINY, seed=TINY.seed + 1), workers=1)
    assert _digest(a)["images.txt"] == _digest(tmp_path / "c")["images.txt"]
    assert _digest(a) != _digest(tmp_path / "c")


def test_class_table_covers_classes_with_distinct_part_combinations():
    levels = synth.part_levels(12)
    assert levels == {"wing": 3, "eye": 2, "beak": 2, "tail": 1}
    table = synth.class_table(12)
    assert len({tuple(sorted(c.items())) for c in table}) == 12
    assert len({tuple(sorted(c.items())) for c in synth.class_table(108)}) == 108
    with pytest.raises(ConfigError, match="data.synth.classes: must be between 2 and 108, got 109"):
        synth.part_levels(109)


def _resize_short(arr: np.ndarray, short: int) -> np.ndarray:
    img = Image.fromarray(arr)
    s = short / min(img.size)
    resized = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32)


@pytest.mark.parametrize("part,levels", [("wing", (0, 1)), ("wing", (0, 2)), ("eye", (0, 1)), ("beak", (0, 1))])
def test_class_cue_is_small_legible_at_256_and_mostly_lost_at_112(part, levels):
    """Same scene, two classes: they differ only on a small part, clearly at the preprocessed scale
    (shorter side 256) and far less once the 224 crop is shrunk to 112 (shorter side 128)."""
    base = {"wing": 0, "eye": 0, "beak": 0}
    ratios = []
    for index in range(3):
        a, _ = synth.render(7, index, {**base, part: levels[0]}, 300, 500)
        b, _ = synth.render(7, index, {**base, part: levels[1]}, 300, 500)
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=2)
        changed = diff > 40
        assert 0 < changed.mean() < 0.03, f"{part}: {changed.mean():.4f} of the image changed"
        hi = np.abs(_resize_short(a, 256) - _resize_short(b, 256)).sum()
        lo = np.abs(_resize_short(a, 128) - _resize_short(b, 128)).sum() * 4  # per-area, same units
        ratios.append(lo / hi)
    assert np.mean(ratios) < 0.65, ratios
