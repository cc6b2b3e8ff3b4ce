"""Details sets: deterministic fine-grained sets whose class is the texture of one small part.

The benchmark side of TASN's premise (zooming where the attention says beats a resize to the same
output size) needs sets that differ in what decides the class, not one sample: `tasn data details`
makes them along the axes that matter to the premise (benchmarks/details.py `--suite` runs a few):

- **texture period** (`period`, px of the canvas): 2-8 px is the range where a resize to a third
  (the demo's 168 -> 56) loses the texture (below 6 px) or keeps a trace of it, while a 3-5x zoom
  keeps it;
- **the part's share** of the canvas (`part_share`, 1-20 %): how much a zoom can magnify it;
- **a coarse cue** (`cue`): `card`, a plain light card under the part, visible at any resolution,
  that says where to look and nothing about the class (as a bird against the sky); `shape`, the
  card too, and the part's outline (disc, square, triangle, cross) is one factor of the class, so a
  low-resolution view reads half of it; `blob`, no card: the part is a patch of its two colours
  among the clutter, whose mean colour may or may not stand out; `none`, no card, and the texture
  is a zero-mean modulation of the clutter under it, so once averaged the part is gone and only the
  texture says where it is;
- **classes** (up to 8 textures; x 2 outlines up to 8 classes with `shape`, x 4 above) and
  **images per class** (`train_per_class` + `test_per_class`).

Everything else is a nuisance shared by all classes: the clutter (a smooth colour field, shapes and
lines, as the embedded set's), the part's place, size (+-12 % in area), elongation and rotation,
the texture's rotation and period (+-8 %), its two colours (a dark and a light one in random order,
so neither the mean colour nor the contrast is a cue). Textures are antialiased over one pixel.
Every image is a pure function of (seed, index, class), so the set is the same for any number of
worker processes; each image of the set has its own index, so its own scene (a set where image k of
every class shared one scene, differing only in the cues, kept the baseline at out_size at chance
for 616 steps at lr 0.1 and 0.02: nothing but the cue to fit, from random weights it never
started), while two classes rendered at one index differ only in their class cues (what the tests
check).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasn.config import DetailsConfig, check
from tasn.config.schema import DETAILS_SHAPES, DETAILS_TEXTURES, FASHION_CROP_MARGIN
from tasn.data.contact_sheet import Box, draw_contact_sheet
from tasn.data.fashion import clutter
from tasn.data.images import write_jpeg
from tasn.data.layout import write_layout
from tasn.data.parallel import imap
from tasn.data.synth import pattern, soft, two_tone
from tasn.io import atomic_dir, atomic_write_json

# In the order classes take them: the first four are the most unlike at any period.
TEXTURES = ("stripes", "checker", "dots", "waves", "grid", "blobs", "rings", "zigzag")
SHAPES = ("disc", "square", "triangle", "cross")
assert len(TEXTURES) == DETAILS_TEXTURES and len(SHAPES) == DETAILS_SHAPES  # the config's bounds
CARD = 1.6  # the card's radius, in part radii (a triangle's corners reach 1.56)
MODULATION = 70.0  # `none`: the texture's amplitude around the clutter, per channel (0-255)


def class_table(cfg: DetailsConfig) -> list[tuple[str, str | None]]:
    """(texture, outline or None) of each class. With the `shape` cue the outline varies fastest
    over 2 outlines up to 8 classes, over 4 above; otherwise the part is a plain ellipse."""
    if cfg.cue != "shape":
        return [(TEXTURES[k], None) for k in range(cfg.classes)]
    shapes = 2 if cfg.classes <= 8 else len(SHAPES)
    return [(TEXTURES[k // shapes], SHAPES[k % shapes]) for k in range(cfg.classes)]


def class_dir(label: int, texture: str, shape: str | None) -> str:
    """CUB-style directory name, e.g. `003.Dots` or `003.Disc_checker`."""
    name = f"{shape.capitalize()}_{texture}" if shape else texture.capitalize()
    return f"{label + 1:03d}.{name}"


def texture(kind: str, p: np.ndarray, q: np.ndarray, period: float, waves: np.ndarray) -> np.ndarray:
    """Share of the second colour (0-1, about half on average) at part-frame pixel coordinates.
    `waves` (3 x 2: direction, phase) shape the aperiodic `blobs`."""
    w = 2 * math.pi / period
    if kind in ("stripes", "checker", "dots", "waves", "rings"):  # synth's patterns, at 1 px per px
        return pattern(kind, p, q, period, 1.0)
    if kind == "grid":  # lines both ways, 0.3 period wide: about half the area

        def line(u: np.ndarray) -> np.ndarray:
            return np.abs(np.mod(u / period + 0.5, 1.0) - 0.5) * period

        return soft(0.15 * period - np.minimum(line(p), line(q)))
    if kind == "zigzag":  # stripes folded into chevrons two periods wide
        fold = np.abs(np.mod(p / (2 * period), 1.0) - 0.5) * 2 * period
        return soft(np.sin(w * (q + fold)) * period / (2 * math.pi))
    if kind == "blobs":  # three plane waves, about 60 degrees apart, random phases: blobs of the period, no lattice
        field = sum(np.cos(w * (p * math.cos(a) + q * math.sin(a)) + f) for a, f in waves)
        return soft(np.asarray(field) * period / (2 * math.pi))
    raise ValueError(f"unknown texture {kind!r}")


def outline(shape: str | None, p: np.ndarray, q: np.ndarray, r: float, stretch: float) -> np.ndarray:
    """Signed distance (px, negative inside) of the part of area pi r^2 centred at p = q = 0."""
    if shape is None or shape == "disc":  # `None`: an ellipse of aspect stretch^2, no class in it
        a, b = (r * stretch, r / stretch) if shape is None else (r, r)
        return (np.sqrt((p / a) ** 2 + (q / b) ** 2) - 1.0) * min(a, b)
    if shape == "square":
        return np.maximum(np.abs(p), np.abs(q)) - r * math.sqrt(math.pi) / 2
    if shape == "triangle":  # equilateral, centroid at the origin
        c = r * math.sqrt(math.pi / (3 * math.sqrt(3)))  # inradius
        return np.max([p * math.cos(t) + q * math.sin(t) for t in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)],
                      axis=0) - c
    if shape == "cross":  # a plus of arms a third of its width
        h = r * math.sqrt(math.pi / 5) * 1.5  # half-width: area 5 (2h/3)^2 = pi r^2
        arm = h / 3
        return np.minimum(np.maximum(np.abs(p) - h, np.abs(q) - arm), np.maximum(np.abs(p) - arm, np.abs(q) - h))
    raise ValueError(f"unknown shape {shape!r}")


def extent(shape: str | None, r: float, stretch: float) -> float:
    """Radius of a disc about the centre that holds the part."""
    return {None: r * stretch, "disc": r, "square": r * math.sqrt(math.pi / 2), "cross": r * 1.5 * math.sqrt(
        math.pi / 5) * math.hypot(1, 1 / 3), "triangle": 2 * r * math.sqrt(math.pi / (3 * math.sqrt(3)))}[shape]


def render(seed: int, index: int, kind: str, shape: str | None, cfg: DetailsConfig) -> tuple[np.ndarray, Box]:
    """One canvas (side x side x 3, uint8) with a part of texture `kind` (and outline `shape`),
    and the box around the part (with its card). Everything but the class cues is drawn from
    `default_rng([seed, index])`."""
    rng = np.random.default_rng([seed, index])
    side = cfg.side
    arr = clutter(rng, side)
    # every nuisance is drawn whatever the class, so classes at one index share the scene
    r = math.sqrt(cfg.part_share * rng.uniform(0.88, 1.12) * side * side / math.pi)
    stretch, angle = rng.uniform(1.0, 1.2), rng.uniform(0, 2 * math.pi)
    period = cfg.period * rng.uniform(0.92, 1.08)
    waves = np.stack([rng.uniform(0, math.pi) + np.arange(3) * math.pi / 3 + rng.uniform(-0.3, 0.3, 3),
                      rng.uniform(0, 2 * math.pi, 3)], axis=1)
    square_card, card_colour = rng.random() < 0.5, colour_near_white(rng)
    direction = rng.normal(size=3)
    dark, light = two_tone(rng)
    carded = cfg.cue in ("card", "shape")
    reach = CARD * r if carded else extent(shape, r, stretch)
    lo, hi = FASHION_CROP_MARGIN + reach + 1, side - FASHION_CROP_MARGIN - reach - 1
    cx, cy = rng.uniform(lo, hi, size=2) if lo < hi else (side / 2, side / 2)

    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    p, q = dx * c + dy * s, -dx * s + dy * c
    if carded:  # a light card, square or round (at random: no label in it)
        dist = np.maximum(np.abs(dx), np.abs(dy)) * 1.1 if square_card else np.hypot(dx, dy)
        card = soft((reach - dist) / 1.5)[..., None]
        arr = arr * (1 - card) + card_colour * card
    t = texture(kind, p, q, period, waves)[..., None]
    if cfg.cue == "none":  # zero mean over the clutter: a resize that averages it away sees no part
        tone = arr + (2 * t - 1) * (MODULATION * direction / np.abs(direction).max())
    else:
        tone = dark * (1 - t) + light * t
    mask = soft(-outline(shape, p, q, r, stretch))[..., None]
    arr = arr * (1 - mask) + tone * mask
    return np.clip(arr, 0, 255).astype(np.uint8), Box(float(cx), float(cy), float(reach))


def colour_near_white(rng: np.random.Generator) -> np.ndarray:
    """A light, faintly tinted colour (0-255): the card."""
    return 255 * 0.6 + rng.uniform(0.75, 1.0, size=3).astype(np.float32) * 255 * 0.4


@dataclass
class _Job:
    seed: int
    index: int
    kind: str
    shape: str | None
    cfg: DetailsConfig
    path: str


def _render_job(job: _Job) -> Box:
    arr, box = render(job.seed, job.index, job.kind, job.shape, job.cfg)
    write_jpeg(job.path, arr, job.cfg.jpeg_quality)
    return box


def generate(dest: str | os.PathLike, cfg: DetailsConfig, workers: int = 0,
             contact_sheet: str | os.PathLike | None = None) -> dict:
    """Write the set in the CUB layout at `dest` (replaced atomically); return a summary.

    Besides the images and the four tables: `details.json` (the summary and the settings) and a
    contact sheet (a few images per class, and the first one's part at full resolution and at a
    third of it, about what the demo's baseline sees) at `dest/contact_sheet.png` unless
    `contact_sheet` names another path.
    """
    check(cfg, "data.details.")
    table = class_table(cfg)
    dirs = [class_dir(k, kind, shape) for k, (kind, shape) in enumerate(table)]
    per_class = cfg.train_per_class + cfg.test_per_class
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        jobs: list[_Job] = []
        rows: list[tuple[str, int, bool]] = []
        for label, ((kind, shape), cdir) in enumerate(zip(table, dirs)):
            (tmp / "images" / cdir).mkdir(parents=True)
            for k in range(per_class):  # every image its own scene: index = its place in the set
                split = "train" if k < cfg.train_per_class else "test"
                rel = f"{cdir}/{split}_{k + 1:04d}.jpg"
                jobs.append(_Job(cfg.seed, label * per_class + k, kind, shape, cfg, str(tmp / "images" / rel)))
                rows.append((rel, label + 1, split == "train"))
        boxes = list(imap(_render_job, jobs, workers, desc="details"))
        write_layout(tmp, rows, dirs)
        views = ((cfg.side, f"part at {cfg.side} px (TASN input)"),
                 (cfg.side // 3, f"at {cfg.side // 3} px (baseline)"))
        draw_contact_sheet(Path(contact_sheet) if contact_sheet else tmp / "contact_sheet.png",
                           tmp / "images", rows, dirs, boxes, views, per_row=4)
        summary: dict[str, Any] = {
            "classes": cfg.classes,
            "images": len(rows),
            "train": sum(r[2] for r in rows),
            "test": sum(not r[2] for r in rows),
            "bytes": sum(f.stat().st_size for f in (tmp / "images").rglob("*.jpg")),
            "seed": cfg.seed,
            "cue": cfg.cue,
            "period_px": cfg.period,
            "part_share": cfg.part_share,
            "class_dirs": dirs,
        }
        atomic_write_json(tmp / "details.json", summary)
    summary["contact_sheet"] = str(contact_sheet) if contact_sheet else str(dest / "contact_sheet.png")
    return summary
