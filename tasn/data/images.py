"""Decoding one raw image, and turning any of the modes people ship into 8-bit RGB.

Grayscale, CMYK, RGBA / palette with transparency, 16-bit and EXIF-rotated images are valid input:
they are converted here, not rejected. What is rejected is what cannot be decoded at all (an empty
file, a truncated JPEG, text with an image suffix), with a reason a person can act on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasn.errors import DataError

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # large scans are fine; decompression bombs are not


def decode(path: str | os.PathLike) -> Image.Image:
    """Fully decode `path` (EXIF orientation not yet applied); DataError says why it cannot be."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file is missing") from None
    if size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (no decoder recognises its contents)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        truncated = any(w in str(exc).lower() for w in ("truncated", "broken", "premature"))
        reason = "truncated or corrupt" if truncated else "cannot be decoded"
        raise DataError(f"{path}: {reason} ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation, then convert to 8-bit RGB (transparency composited on white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):  # 16-bit grey: 0..65535 -> 0..255
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(arr.round().astype(np.uint8), "L")
    elif img.mode in ("I", "F"):  # 32-bit grey has no fixed range: stretch what is there
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img
