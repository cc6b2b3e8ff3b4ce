"""A contact sheet of the synthetic sample: does the class read at full size and vanish at 112 px?

One row per class: a few whole images, then two close-ups of the first image's bird, one at the
preprocessed scale (shorter side 256, what TASN crops 224 px from) and one at the scale the
baseline sees (the 224 crop resized to 112), both blown up to the same size for the eye.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from tasn.io import atomic_write_bytes

THUMB = 170


def _fit(img: Image.Image, side: int) -> Image.Image:
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    return img


def _closeup(img: Image.Image, bird, short_side: int) -> Image.Image:
    """The bird's box in `img` resized so its shorter side is `short_side`, shown at THUMB px."""
    scale = short_side / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    small = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    half = 0.62 * bird.length * scale
    cx, cy = bird.cx * scale, bird.cy * scale
    box = tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half))
    return small.crop(box).resize((THUMB, THUMB), Image.Resampling.NEAREST)


def draw_contact_sheet(path, images_dir: Path, rows, class_dirs, birds, per_row: int = 4) -> Path:
    """Write the sheet as PNG to `path` (atomically). `rows`/`birds` are in image-id order."""
    label_h, pad = 16, 4
    cols = per_row + 2
    size = (cols * (THUMB + pad) + pad, len(class_dirs) * (THUMB + label_h + pad) + label_h + pad)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    x_close = per_row * (THUMB + pad) + pad
    draw.text((x_close, 2), "bird at 256 px (TASN input)", fill="black")
    draw.text((x_close + THUMB + pad, 2), "bird at 112 px (baseline)", fill="black")
    for label, cdir in enumerate(class_dirs):
        members = [i for i, r in enumerate(rows) if r[1] == label + 1][:per_row]
        y = label_h + label * (THUMB + label_h + pad)
        draw.text((pad, y), cdir, fill="black")
        for col, i in enumerate(members):
            with Image.open(images_dir / rows[i][0]) as f:
                im = f.convert("RGB")
                sheet.paste(_fit(im, THUMB), (pad + col * (THUMB + pad), y + label_h))
                if col == 0:
                    sheet.paste(_closeup(im, birds[i], 256), (x_close, y + label_h))
                    sheet.paste(_closeup(im, birds[i], 128), (x_close + THUMB + pad, y + label_h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())
