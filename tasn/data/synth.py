"""The embedded fine-grained sample: stylised birds whose class lives only in small, fine-scale parts.

What TASN is for is seeing details that a plain downsampled image loses. Every image here holds one
bird of the same global shape (body, wing, head, beak, eye, tail) at a random position, scale,
rotation and facing, over a cluttered background with a few patterned distractor blobs. Colours of
every part are random nuisances shared by all classes. The class is decided only by the *texture*
of a few small parts (each well under 3 % of the image area): the wing's pattern (stripes, checks,
spots, waves), the eye's (rings, rays, checks), the beak's and the tail's. Each texture mixes its
two colours about half and half with a period of 3-4 px at the preprocessed scale (shorter side
256), so the mean colour of a part says nothing about the class and a resize to 112 px averages the
pattern away, while a 224 px crop, or an attention-sampled zoom, still resolves it.

Rendering is numpy on the bird's bounding box (implicit shapes with one-pixel soft edges) plus PIL
for the background; every image is a pure function of (seed, image index), so the set is the same
for any number of worker processes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasn.config import ConfigError, SynthConfig
from tasn.data.contact_sheet import Box, draw_contact_sheet
from tasn.data.images import write_jpeg
from tasn.data.layout import write_layout
from tasn.data.parallel import imap
from tasn.io import atomic_dir, atomic_write_json

REF_SIDE = 256  # pattern periods are given in pixels at this shorter side (the demo's preprocess.size)

# Each part's class-deciding textures: (name, pattern, period in reference pixels). The first
# entry is used when the part is not needed to tell the classes apart.
PARTS: dict[str, list[tuple[str, str, float]]] = {
    "wing": [("Striped", "stripes", 3.5), ("Checkered", "checker", 4.0), ("Spotted", "dots", 4.0),
             ("Wavy", "waves", 3.5)],
    "eye": [("Ringed", "rings", 3.0), ("Rayed", "spokes", 8.0), ("Checkered", "checker", 3.0)],
    "beak": [("Barred", "bars", 3.0), ("Checkered", "checker", 3.0), ("Spotted", "dots", 3.5)],
    "tail": [("Barred", "bars", 3.5), ("Checkered", "checker", 4.0), ("Spotted", "dots", 4.0)],
}
# Which part gains a texture next as the number of classes grows: wing x eye x beak first.
GROWTH = ("wing", "eye", "beak", "wing", "eye", "beak", "wing", "tail", "tail")


def part_levels(n_classes: int) -> dict[str, int]:
    """How many textures each part uses so that their combinations cover `n_classes` classes."""
    levels = {part: 1 for part in PARTS}
    for part in GROWTH:
        if math.prod(levels.values()) >= n_classes:
            break
        levels[part] += 1
    capacity = math.prod(len(v) for v in PARTS.values())
    if n_classes < 2 or math.prod(levels.values()) < n_classes:
        raise ConfigError(f"data.synth.classes: must be between 2 and {capacity}, got {n_classes}")
    return levels


def class_table(n_classes: int) -> list[dict[str, int]]:
    """Texture index of each class-deciding part, per class (wing varies fastest).

    Parts that do not vary are left out: they get their first texture (the tail: a plain colour).
    """
    levels = {p: n for p, n in part_levels(n_classes).items() if n > 1}
    combos = []
    for index in range(math.prod(levels.values())):
        combo, rest = {}, index
        for part, n in levels.items():
            combo[part], rest = rest % n, rest // n
        combos.append(combo)
    return combos[:n_classes]


def class_dir(label: int, combo: dict[str, int]) -> str:
    """CUB-style directory name, e.g. `003.Spotted_wing_Ringed_eye_Barred_beak`."""
    words = [f"{PARTS[p][i][0]}_{p}" for p, i in combo.items()]
    return f"{label + 1:03d}." + "_".join(words)


# --- patterns: t in [0, 1] = share of the part's second colour, ~50 % on average for every one ---


def soft(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0.0, 1.0)


def pattern(kind: str, p: np.ndarray, q: np.ndarray, period: float, px: float) -> np.ndarray:
    """Texture `kind` at part-frame coordinates (p along, q across the part; reference pixels).

    `px` is image pixels per reference pixel: edges are softened over about one image pixel.
    """
    w = 2 * math.pi / period
    if kind == "stripes":  # stripes running along the part
        return soft(np.sin(w * q) * period * px / (2 * math.pi))
    if kind == "bars":  # bars across the part
        return soft(np.sin(w * p) * period * px / (2 * math.pi))
    if kind == "waves":
        return soft(np.sin(w * (q + 0.4 * period * np.sin(w * p / 2.5))) * period * px / (2 * math.pi))
    if kind == "checker":
        return soft(np.sin(w * p) * np.sin(w * q) * period * px)
    if kind == "dots":  # discs of radius 0.4 period on a square lattice: half the area
        dp = (np.mod(p / period + 0.5, 1.0) - 0.5) * period
        dq = (np.mod(q / period + 0.5, 1.0) - 0.5) * period
        return soft((0.4 * period - np.hypot(dp, dq)) * px)
    if kind == "rings":
        return soft(np.sin(w * np.hypot(p, q)) * period * px / (2 * math.pi))
    if kind == "spokes":  # `period` is the number of rays
        r = np.hypot(p, q)
        return soft(np.sin(period * np.arctan2(q, p)) * r * px / period)
    raise ValueError(f"unknown pattern {kind!r}")


# --- shapes: signed distance (negative inside) in bird-length units ---


def _ellipse(u, v, cu, cv, a, b, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    x, y = (u - cu) * c + (v - cv) * s, -(u - cu) * s + (v - cv) * c
    return (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1.0) * min(a, b), x, y


def _triangle(u, v, pts):
    """Convex polygon (either winding) as the max of its edges' signed distances."""
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))
    if area2 < 0:
        pts = pts[::-1]
    d = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        ex, ey = x1 - x0, y1 - y0
        n = math.hypot(ex, ey)
        e = ((u - x0) * ey - (v - y0) * ex) / n
        d = e if d is None else np.maximum(d, e)
    return d


def _colour(rng, lo: float, hi: float) -> np.ndarray:
    """A random RGB colour with HSV value in [lo, hi]."""
    h, s, v = rng.random(), rng.uniform(0.3, 1.0), rng.uniform(lo, hi)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32) * 255


def two_tone(rng) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light colour, in random order: the pattern's contrast is never a class cue."""
    pair = [_colour(rng, 0.08, 0.35), _colour(rng, 0.7, 1.0)]
    return (pair[0], pair[1]) if rng.random() < 0.5 else (pair[1], pair[0])


def _background(rng, w: int, h: int, px: float) -> np.ndarray:
    """Smooth colour field, random shapes and lines, and two textured distractor blobs."""
    grid = (rng.random((3, 4, 3)) * 200 + 30).astype(np.uint8)
    lw, lh = (w + 1) // 2, (h + 1) // 2  # clutter is drawn at half size: upscaling softens it
    img = Image.fromarray(grid).resize((lw, lh), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(10, 22))):
        x, y = rng.uniform(-0.1, 1.1) * lw, rng.uniform(-0.1, 1.1) * lh
        r = rng.uniform(0.03, 0.18) * min(lw, lh)
        fill = tuple(int(c) for c in _colour(rng, 0.2, 0.95))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r * rng.uniform(0.3, 1)], fill=fill)
        elif kind == 1:
            pts = [(x + r * math.cos(a), y + r * math.sin(a)) for a in np.sort(rng.uniform(0, 2 * math.pi, 5))]
            draw.polygon(pts, fill=fill)
        else:
            draw.line([x, y, x + rng.uniform(-3, 3) * r, y + rng.uniform(-3, 3) * r], fill=fill,
                      width=int(rng.integers(1, 5)))
    img = img.filter(ImageFilter.BoxBlur(rng.uniform(0.0, 1.0) * px)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32).copy()
    kinds = [k for part in PARTS.values() for _, k, _ in part]
    periods = [p for part in PARTS.values() for _, _, p in part]
    for _ in range(2):  # distractors: the same textures, on no bird
        j = int(rng.integers(len(kinds)))
        r = rng.uniform(0.04, 0.08) * min(w, h)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        x0, y0, x1, y1 = int(cx - r), int(cy - r), int(cx + r) + 1, int(cy + r) + 1
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dist = np.hypot(xx - cx, yy - cy) - r * np.where(np.arctan2(yy - cy, xx - cx) > 0, 1.0, 0.6)
        mask = soft(-dist)[..., None]
        c0, c1 = two_tone(rng)
        t = pattern(kinds[j], (xx - cx) / px, (yy - cy) / px, periods[j], px)[..., None]
        arr[y0:y1, x0:x1] = arr[y0:y1, x0:x1] * (1 - mask) + (c0 * (1 - t) + c1 * t) * mask
    return arr


def render(seed: int, index: int, combo: dict[str, int], min_side: int, max_side: int) -> tuple[np.ndarray, Box]:
    """One image (H, W, 3 uint8) of a bird with the textures `combo`, and the box around the bird.

    Everything except the textures is drawn from `default_rng([seed, index])`, so rendering the same
    (seed, index) with two different combos gives the same scene with different class cues.
    """
    rng = np.random.default_rng([seed, index])
    w, h = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
    short = min(w, h)
    px = short / REF_SIDE
    arr = _background(rng, w, h, px)

    length = rng.uniform(0.42, 0.6) * short
    cx = w / 2 + rng.uniform(-0.08, 0.08) * short
    cy = h / 2 + rng.uniform(-0.08, 0.08) * short
    theta = math.radians(rng.uniform(-35, 35))
    facing = 1.0 if rng.random() < 0.5 else -1.0
    half = int(0.75 * length) + 2
    x0, x1 = max(0, int(cx) - half), min(w, int(cx) + half)
    y0, y1 = max(0, int(cy) - half), min(h, int(cy) + half)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(theta), math.sin(theta)
    u = facing * (dx * c + dy * s) / length  # bird frame, units of body length; +u = towards beak
    v = (-dx * s + dy * c) / length  # +v = belly
    to_ref = length / px  # bird units -> reference pixels
    jit = lambda: rng.uniform(0.9, 1.1)  # noqa: E731 - shape nuisance, shared by all classes

    body_col, head_col = _colour(rng, 0.3, 0.9), _colour(rng, 0.3, 0.9)
    region = arr[y0:y1, x0:x1]
    layers: list[tuple[str | None, np.ndarray, Any, Any, Any]] = []  # part, distance, p, q, flat colour
    tail_lift = rng.uniform(-0.06, 0.06)
    tail = _triangle(u, v, [(-0.2, -0.03), (-0.52, -0.11 * jit() + tail_lift), (-0.52, 0.11 * jit() + tail_lift),
                            (-0.2, 0.05)])
    layers.append(("tail", tail, u + 0.36, v - tail_lift, body_col))
    body, _, _ = _ellipse(u, v, 0.0, 0.0, 0.3 * jit(), 0.15 * jit())
    layers.append((None, body, None, None, body_col))
    wing_angle = math.radians(rng.uniform(-12, 6))
    wing, wp, wq = _ellipse(u, v, -0.04, -0.01, 0.2, 0.075, wing_angle)
    layers.append(("wing", wing, wp, wq, None))
    hv = -0.11 + rng.uniform(-0.03, 0.03)
    head, _, _ = _ellipse(u, v, 0.3, hv, 0.12, 0.12)
    layers.append((None, head, None, None, head_col))
    tip = 0.58 + rng.uniform(-0.02, 0.03)
    beak = _triangle(u, v, [(0.39, hv - 0.055), (tip, hv + rng.uniform(-0.02, 0.02)), (0.39, hv + 0.055)][::-1])
    layers.append(("beak", beak, u - 0.39, v - hv, None))
    eye, ep, eq = _ellipse(u, v, 0.33, hv - 0.025, 0.05, 0.05)
    layers.append(("eye", eye, ep, eq, None))

    for part, dist, p, q, flat in layers:
        inside = dist * length < 0.5  # signed distance in image pixels; 1 px soft edge
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if part is None or (part == "tail" and "tail" not in combo):
            colour: Any = flat
            pattern_args = None
        else:
            colour = two_tone(rng)
            pattern_args = PARTS[part][combo.get(part, 0)][1:]
        if not len(rows) or not len(cols):
            continue  # the part fell outside the image
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask = soft(-dist[box] * length)[..., None]
        if pattern_args is not None:
            kind, period = pattern_args
            t = pattern(kind, p[box] * to_ref, q[box] * to_ref, period, px)[..., None]
            colour = colour[0] * (1 - t) + colour[1] * t
        region[box] = region[box] * (1 - mask) + colour * mask
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * 2.0  # sensor-like noise
    return np.clip(arr, 0, 255).astype(np.uint8), Box(cx, cy, 0.62 * length)


@dataclass
class _Job:
    seed: int
    index: int
    combo: dict[str, int]
    min_side: int
    max_side: int
    quality: int
    path: str


def _render_job(job: _Job) -> Box:
    arr, bird = render(job.seed, job.index, job.combo, job.min_side, job.max_side)
    write_jpeg(job.path, arr, job.quality)
    return bird


def generate(dest: str | os.PathLike, cfg: SynthConfig, workers: int = 0,
             contact_sheet: str | os.PathLike | None = None) -> dict:
    """Write the synthetic set in the CUB layout at `dest` (replaced atomically); return a summary.

    The contact sheet (a few images per class, with full-resolution and 112 px close-ups of the
    bird) goes to `dest/contact_sheet.png` unless `contact_sheet` names another path.
    """
    if not 64 <= cfg.min_side <= cfg.max_side:
        raise ConfigError(f"data.synth: need 64 <= min_side <= max_side, got {cfg.min_side}, {cfg.max_side}")
    if cfg.train_per_class < 1 or cfg.test_per_class < 1:
        raise ConfigError("data.synth.train_per_class and test_per_class must be >= 1")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"data.synth.jpeg_quality: must be in 1..100, got {cfg.jpeg_quality}")
    combos = class_table(cfg.classes)
    dirs = [class_dir(k, combo) for k, combo in enumerate(combos)]
    per_class = cfg.train_per_class + cfg.test_per_class
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        jobs, rows = [], []
        for label, (combo, cdir) in enumerate(zip(combos, dirs)):
            (tmp / "images" / cdir).mkdir(parents=True)
            for k in range(per_class):
                rel = f"{cdir}/{cdir.split('.', 1)[1]}_{k + 1:04d}.jpg"
                index = label * per_class + k
                jobs.append(_Job(cfg.seed, index, combo, cfg.min_side, cfg.max_side, cfg.jpeg_quality,
                                 str(tmp / "images" / rel)))
                rows.append((rel, label + 1, k < cfg.train_per_class))
        birds = list(imap(_render_job, jobs, workers, desc="synth"))
        write_layout(tmp, rows, dirs)
        sheet = Path(contact_sheet) if contact_sheet else tmp / "contact_sheet.png"
        views = ((REF_SIDE, f"bird at {REF_SIDE} px (TASN input)"),
                 (REF_SIDE // 2, f"bird at {REF_SIDE // 2} px (baseline)"))
        draw_contact_sheet(sheet, tmp / "images", rows, dirs, birds, views, per_row=4)
        size = sum(f.stat().st_size for f in (tmp / "images").rglob("*.jpg"))
        summary = {
            "classes": cfg.classes,
            "images": len(rows),
            "train": sum(r[2] for r in rows),
            "test": sum(not r[2] for r in rows),
            "bytes": size,
            "seed": cfg.seed,
            "parts": {p: [PARTS[p][i][0] for i in range(n)] for p, n in part_levels(cfg.classes).items() if n > 1},
        }
        atomic_write_json(tmp / "synth.json", summary)
    if contact_sheet is None:
        summary["contact_sheet"] = str(dest / "contact_sheet.png")
    else:
        summary["contact_sheet"] = str(contact_sheet)
    return summary
