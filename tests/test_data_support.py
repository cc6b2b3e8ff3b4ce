"""Builders shared by the data tests (tiny synthetic sets, hand-made CUB trees) and their own checks."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasn.cli import main
from tasn.config import PreprocessConfig, SynthConfig, ValidateConfig
from tasn.data.layout import check_layout, read_layout
from tasn.data.synth import generate
from tasn.errors import DataError

TINY = SynthConfig(classes=4, train_per_class=2, test_per_class=1, min_side=96, max_side=128, seed=3, jpeg_quality=90)
TINY_PREP = PreprocessConfig(size=64, jpeg_quality=90, workers=1)
TINY_VALIDATE = ValidateConfig(min_side=32, workers=1)


def tiny_synth(dest: Path, cfg: SynthConfig = TINY) -> Path:
    generate(dest, cfg, workers=1)
    return dest


def tree_with_outputs(base: Path, params: str, runs: list[list[str]]) -> Path:
    """`base` holding a tiny raw set (raw/), `params` as params.yaml, and what the `tasn` commands
    `runs` (each run in `base`, each must succeed) made of them."""
    tiny_synth(base / "raw")
    (base / "params.yaml").write_text(params)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        for argv in runs:
            assert main(argv) == 0, argv
    return base


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def noise_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_cub_tree(root: Path, n_classes: int = 3, train: int = 3, test: int = 2, seed: int = 0) -> Path:
    """A small CUB-200-2011-shaped tree, with the bounding_boxes.txt and parts/ that importers ignore."""
    rng = np.random.default_rng(seed)
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani", "Crested_Auklet"]
    lines: dict[str, list[str]] = {"images": [], "labels": [], "split": [], "classes": [], "boxes": []}
    image_id = 0
    for c in range(n_classes):
        cdir = f"{c + 1:03d}.{names[c]}"
        (root / "images" / cdir).mkdir(parents=True)
        lines["classes"].append(f"{c + 1} {cdir}")
        for k in range(train + test):
            image_id += 1
            rel = f"{cdir}/{names[c]}_{k + 1:04d}_{image_id}.jpg"
            h, w = int(rng.integers(60, 90)), int(rng.integers(60, 90))
            (root / "images" / rel).write_bytes(jpeg_bytes(noise_image(rng, h, w)))
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(k < train)}")
            lines["boxes"].append(f"{image_id} 1.0 2.0 30.0 40.0")
    for key, name in [("images", "images.txt"), ("labels", "image_class_labels.txt"), ("split", "train_test_split.txt"),
                      ("classes", "classes.txt"), ("boxes", "bounding_boxes.txt")]:
        (root / name).write_text("\n".join(lines[key]) + "\n")
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text("1 back\n")
    return root


def test_make_cub_tree_is_a_consistent_layout(tmp_path):
    layout = read_layout(make_cub_tree(tmp_path / "cub"))
    check_layout(layout)
    assert len(layout.images) == 15
    assert layout.class_names() == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert int(layout.images["is_train"].sum()) == 9


def test_read_layout_rejects_unparseable_lines(tmp_path):
    root = make_cub_tree(tmp_path / "cub")
    (root / "image_class_labels.txt").write_text("1 1\n2 two\n")
    with pytest.raises(DataError, match=r"image_class_labels.txt:2: expected '<id> <int>', got '2 two'"):
        read_layout(root)


def idx_bytes(arr: np.ndarray) -> bytes:
    """`arr` (uint8) in the idx format of Fashion-MNIST's files, gzipped."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def fake_fashion_source(root: Path, per_label: tuple[int, int] = (4, 2), seed: int = 0) -> Path:
    """Fashion-MNIST's four files with made-up garments: label k is a bright blob with k + 1 dark
    bars across it, so every label differs in fine detail only. `per_label`: (train, test)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", per_label[0]), ("t10k", per_label[1])):
        labels = np.repeat(np.arange(10), count)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for i, k in enumerate(labels):
            images[i, 4:24, 6:22] = rng.integers(150, 256)
            for b in range(k + 1):
                images[i, 5 + 2 * b, 7:21] = 40
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_bytes(images))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels))
    return root
