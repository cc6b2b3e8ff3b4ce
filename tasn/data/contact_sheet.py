"""A contact sheet of a generated sample: does the class read at full size and vanish at out_size?

One row per class: a few whole images, then two close-ups of the first image's class-deciding
object, one at the scale TASN samples from and one at the scale the baseline sees, both blown up
to the same size for the eye. Used by `tasn data synth` and `tasn data fashion`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from tasn.io import atomic_write_bytes

THUMB = 170


@dataclass
class Box:
    """Where the class-deciding object is, in image pixels: its centre and half its side."""

    cx: float
    cy: float
    half: float


def _fit(img: Image.Image, side: int) -> Image.Image:
    img = img.copy()
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    return img


def _closeup(img: Image.Image, box: Box, short_side: int) -> Image.Image:
    """`box` of `img` resized so the image's shorter side is `short_side`, shown at THUMB px."""
    scale = short_side / min(img.size)
    size = (round(img.width * scale), round(img.height * scale))
    small = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    half, cx, cy = box.half * scale, box.cx * scale, box.cy * scale
    corners = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    return small.crop(corners).resize((THUMB, THUMB), Image.Resampling.NEAREST)


def draw_contact_sheet(path, images_dir: Path, rows, class_dirs, boxes: list[Box],
                       views: tuple[tuple[int, str], tuple[int, str]], per_row: int = 4) -> Path:
    """Write the sheet as PNG to `path` (atomically). `rows`/`boxes` are in image-id order;
    `views` are the two close-ups, (shorter side of the image, column title)."""
    label_h, pad = 16, 4
    cols = per_row + 2
    size = (cols * (THUMB + pad) + pad, len(class_dirs) * (THUMB + label_h + pad) + label_h + pad)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    x_close = per_row * (THUMB + pad) + pad
    for k, (_, title) in enumerate(views):
        draw.text((x_close + k * (THUMB + pad), 2), title, fill="black")
    for label, cdir in enumerate(class_dirs):
        members = [i for i, r in enumerate(rows) if r[1] == label + 1][:per_row]
        y = label_h + label * (THUMB + label_h + pad)
        draw.text((pad, y), cdir, fill="black")
        for col, i in enumerate(members):
            with Image.open(images_dir / rows[i][0]) as f:
                im = f.convert("RGB")
                sheet.paste(_fit(im, THUMB), (pad + col * (THUMB + pad), y + label_h))
                if col == 0:
                    for k, (short_side, _) in enumerate(views):
                        sheet.paste(_closeup(im, boxes[i], short_side), (x_close + k * (THUMB + pad), y + label_h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())
