"""The embedded default dataset: Fashion-MNIST garments placed small in large, cluttered canvases.

TASN's premise is that zooming into the part that decides the class beats a plain resize to the
same output size. This set is built so that the premise can show from random weights on a CPU:

- **the class is in details a resize loses**: each canvas holds one Fashion-MNIST garment (Zalando's
  28 x 28 grey article images) at its native resolution, 28-36 px in a `side` = 192 px canvas. At
  the demo's `out_size` (56 px for a 168 px crop, a third) the garment is 9-12 px: the outline of a
  trouser, a bag or a shoe survives, but what tells a shirt from a T-shirt, a pullover or a coat,
  or a sneaker from a sandal or an ankle boot, does not. Zoomed 3-4x by the sampler, it does.
- **a coarse cue says where to look**: the garment lies on a light card (a square or a disc) that
  is visible at any resolution, as a bird is against the sky in a real fine-grained photo. Without
  it, 2,400 training images are too few for any of the networks to find a small object among
  clutter from scratch (measured: all at chance; docs/data.md).
- **clutter that carries no label**: a smooth colour field, random shapes and lines; the garment's
  colour and the card's are random; its position, size, tilt and mirror too.

The train split takes its garments from Fashion-MNIST's training file and the test split from its
test file, so no garment is in both. Every canvas is a pure function of (seed, index, garment), and
the garments are drawn with a generator seeded by `seed`, so the set is byte-identical for any
number of worker processes. The source is Debian's `dataset-fashion-mnist` package (the four idx
files in /usr/share/datasets/fashion-mnist); it is needed only to regenerate the set: the repository
carries the result in its DVC remote, and `make run` only pulls it.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasn.choices import FASHION_LABELS
from tasn.config import ConfigError, FashionConfig, check
from tasn.config.schema import FASHION_CROP_MARGIN
from tasn.data.contact_sheet import Box, draw_contact_sheet
from tasn.data.images import write_jpeg
from tasn.data.layout import write_layout
from tasn.data.parallel import imap
from tasn.errors import DataError
from tasn.io import atomic_dir, atomic_write_json

LABELS = FASHION_LABELS  # Fashion-MNIST's labels 0-9, as directory-safe names
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
LICENSE_FILE = "LICENSE-fashion-mnist.txt"
LICENSE = """\
The images in this dataset are composed from Fashion-MNIST
(https://github.com/zalandoresearch/fashion-mnist), as packaged by Debian
(dataset-fashion-mnist), under the MIT (Expat) licence:

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of
the Software, and to permit persons to whom the Software is furnished to do so,
subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS
FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped, unsigned bytes: Fashion-MNIST's format) as an array of its shape."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != 4 + 4 * ndim + math.prod(dims):
        raise DataError(f"{path}: {len(data)} bytes do not hold an array of shape {dims}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,)) of Fashion-MNIST's `split` file pair."""
    paths = [source / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data.fashion.source: {', '.join(missing)} missing; install Debian's "
                        "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or point "
                        "data.fashion.source at a folder holding Fashion-MNIST's four .gz files")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def _colour(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A random RGB colour (0-255) with HSV value in [lo, hi]."""
    h, s, v = rng.random(), rng.uniform(0.2, 1.0), rng.uniform(lo, hi)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32) * 255


def clutter(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth colour field with random ellipses, polygons and lines, slightly blurred."""
    field_ = Image.fromarray((rng.random((3, 3, 3)) * 180 + 40).astype(np.uint8))
    img = field_.resize((side, side), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 16))):
        x, y = rng.uniform(0, side, size=2)
        r = rng.uniform(0.03, 0.15) * side
        fill = tuple(int(c) for c in _colour(rng, 0.25, 0.9))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r * rng.uniform(0.3, 1)], fill=fill)
        elif kind == 1:
            angles = np.sort(rng.uniform(0, 2 * math.pi, 5))
            draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a in angles], fill=fill)
        else:
            draw.line([x, y, x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r], fill=fill,
                      width=int(rng.integers(1, 4)))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5))), np.float32).copy()


def _garment(pixels: np.ndarray, size: int, angle: float, mirror: bool) -> np.ndarray:
    """The 28 x 28 garment scaled to `size`, tilted by `angle` degrees, as floats in [0, 1]."""
    im = Image.fromarray(pixels)
    if mirror:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = im.resize((size, size), Image.Resampling.BICUBIC)
    im = im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    return np.asarray(im, np.float32) / 255.0


def render(seed: int, index: int, pixels: np.ndarray, side: int, item_min: int,
           item_max: int) -> tuple[np.ndarray, Box]:
    """One canvas (side x side x 3, uint8) holding the garment `pixels`, and the box around its card.

    Everything but the garment is drawn from `default_rng([seed, index])`: the same (seed, index)
    with another garment gives the same scene.
    """
    rng = np.random.default_rng([seed, index])
    arr = clutter(rng, side)
    g = _garment(pixels, int(rng.integers(item_min, item_max + 1)), rng.uniform(-15, 15), rng.random() < 0.5)
    half = g.shape[0] * rng.uniform(0.7, 0.8)  # the card's half-side
    lo = FASHION_CROP_MARGIN + half + 1
    cx, cy = rng.uniform(lo, side - lo, size=2)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    if rng.random() < 0.5:
        dist = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) - half
    else:
        dist = np.hypot(xx - cx, yy - cy) - half * 1.15
    card = np.clip(0.5 - dist / 2, 0, 1)[..., None]  # 2 px soft edge
    arr = arr * (1 - card) + (_colour(rng, 0.85, 1.0) * 0.4 + 255 * 0.6) * card
    # the garment: its grey levels shade between a dark and a light colour; its ink is the alpha
    dark, light = _colour(rng, 0.0, 0.3), _colour(rng, 0.75, 1.0)
    if rng.random() < 0.5:
        dark, light = _colour(rng, 0.05, 0.25), _colour(rng, 0.5, 0.8)
    h, w = g.shape
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    region = arr[y0:y0 + h, x0:x0 + w]
    alpha = np.clip(g * 4.0, 0, 1)[..., None]
    region[:] = region * (1 - alpha) + (dark + (light - dark) * g[..., None]) * alpha
    return np.clip(arr, 0, 255).astype(np.uint8), Box(float(cx), float(cy), float(half))


@dataclass
class _Job:
    seed: int
    index: int
    pixels: np.ndarray
    side: int
    item_min: int
    item_max: int
    quality: int
    path: str


def _render_job(job: _Job) -> Box:
    arr, box = render(job.seed, job.index, job.pixels, job.side, job.item_min, job.item_max)
    write_jpeg(job.path, arr, job.quality)
    return box


def generate(dest: str | os.PathLike, cfg: FashionConfig, workers: int = 0,
             contact_sheet: str | os.PathLike | None = None) -> dict:
    """Write the set in the CUB layout at `dest` (replaced atomically); return a summary.

    Besides the images and the four tables: `fashion.json` (the summary, and for every image the
    Fashion-MNIST split and index of its garment), the licence, and a contact sheet (a few images
    per class with close-ups of the garment at full and at a third of the resolution) at
    `dest/contact_sheet.png` unless `contact_sheet` names another path.
    """
    check(cfg, "data.fashion.")
    labels = [LABELS.index(c) for c in cfg.classes]
    source = Path(cfg.source)
    rng = np.random.default_rng(cfg.seed)
    splits = {split: load_split(source, split) for split in FILES}
    dirs = [f"{k + 1:03d}.{LABELS[c]}" for k, c in enumerate(labels)]
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        jobs: list[_Job] = []
        rows: list[tuple[str, int, bool]] = []
        origin: list[dict[str, str]] = []
        for label, (fm_label, cdir) in enumerate(zip(labels, dirs)):
            (tmp / "images" / cdir).mkdir(parents=True)
            for split, count in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
                images, fm_labels = splits[split]
                pool = np.flatnonzero(fm_labels == fm_label)
                if len(pool) < count:
                    raise ConfigError(f"data.fashion.{split}_per_class: {count} is more than the {len(pool)} "
                                      f"{LABELS[fm_label]} images of Fashion-MNIST's {split} file")
                for k, i in enumerate(rng.choice(pool, size=count, replace=False)):
                    rel = f"{cdir}/{split}_{k + 1:04d}.jpg"
                    jobs.append(_Job(cfg.seed, len(jobs), images[i], cfg.side, cfg.item_min, cfg.item_max,
                                     cfg.jpeg_quality, str(tmp / "images" / rel)))
                    rows.append((rel, label + 1, split == "train"))
                    origin.append({"path": rel, "fashion_mnist": f"{split}[{int(i)}]"})
        boxes = list(imap(_render_job, jobs, workers, desc="fashion"))
        write_layout(tmp, rows, dirs)
        (tmp / LICENSE_FILE).write_text(LICENSE)
        views = ((cfg.side, f"garment at {cfg.side} px (TASN input)"),
                 (cfg.side // 3, f"at {cfg.side // 3} px (baseline)"))
        draw_contact_sheet(Path(contact_sheet) if contact_sheet else tmp / "contact_sheet.png",
                           tmp / "images", rows, dirs, boxes, views, per_row=4)
        summary = {
            "classes": list(cfg.classes),
            "images": len(rows),
            "train": sum(r[2] for r in rows),
            "test": sum(not r[2] for r in rows),
            "bytes": sum(f.stat().st_size for f in (tmp / "images").rglob("*.jpg")),
            "seed": cfg.seed,
            "source": "Fashion-MNIST (Zalando SE, MIT licence), " + str(source),
        }
        atomic_write_json(tmp / "fashion.json", {**summary, "images_origin": origin})
    summary["contact_sheet"] = str(contact_sheet) if contact_sheet else str(dest / "contact_sheet.png")
    return summary
