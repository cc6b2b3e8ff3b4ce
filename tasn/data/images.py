"""Decoding one raw image within limits, and turning any of the modes people ship into 8-bit RGB.

Grayscale, CMYK, RGBA / palette with transparency, 16-bit and EXIF-rotated images are valid input:
they are converted here, not rejected. What is rejected is what cannot be decoded at all (an empty
file, a truncated JPEG, text with an image suffix), and what is too large to decode safely, with a
reason a person can act on.

Memory. A decoded image costs 3-4 bytes per pixel, and converting it to RGB a few times that, in
every worker at once; so the pixel count is read from the header and checked against a limit
(`max_pixels`, about Pillow's own 89.5 Mpx default) before anything is decoded. A JPEG that will be
scaled down anyway is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (`at_least`), which is
also how validate checks that a JPEG decodes without holding it at full size.

The other way: `write_jpeg`, the one encoding the generators (`tasn data fashion`, `tasn data
synth`) write their images with, so a set renders to the same bytes wherever it is generated.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasn.config.schema import DEFAULT_MAX_PIXELS, MAX_PIXELS
from tasn.errors import DataError

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own bomb check: a backstop for any other Image.open


@dataclass(frozen=True)
class Header:
    """What an image file says about itself before any pixel is decoded."""

    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _unreadable(path: Path, exc: BaseException) -> DataError:
    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"{path}: not an image (no decoder recognises its contents)")
    truncated = any(w in str(exc).lower() for w in ("truncated", "broken", "premature"))
    reason = "truncated or corrupt" if truncated else "cannot be decoded"
    return DataError(f"{path}: {reason} ({exc})")


_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError)


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """Image.open (the header only) of the file at `path`, or of `data` (the bytes of one, `path`
    then only naming it), with every way it can fail turned into a DataError."""
    if data is None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: file is missing") from None
    else:
        size = len(data)
    if size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path if data is None else io.BytesIO(data))
    except _ERRORS as exc:
        raise _unreadable(path, exc) from None


def read_header(path: str | os.PathLike) -> Header:
    """Size and mode of the image at `path`, decoding nothing; DataError if it is not an image."""
    path = Path(path)
    with _open(path) as img:
        return Header(img.width, img.height, img.mode)


def too_large(header: Header, max_pixels: int) -> str | None:
    """Why an image of `header` is over the pixel limit, or None."""
    if header.pixels <= max_pixels:
        return None
    return (f"{header.width}x{header.height} px = {header.pixels / 1e6:.1f} Mpx, "
            f"more than the limit of {max_pixels / 1e6:g} Mpx")


def decode(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, at_least: int | None = None,
           limit_key: str = "max_pixels", data: bytes | None = None) -> Image.Image:
    """Fully decode `path` (EXIF orientation not yet applied); DataError says why it cannot be.

    An image of more than `max_pixels` (named `limit_key` in the error) is refused before decoding.
    With `at_least`, a JPEG may be decoded at a reduced scale whose sides stay >= `at_least` px.
    With `data`, those bytes are decoded instead of the file, and `path` only names them.
    """
    path = Path(path)
    with _open(path, data) as img:
        reason = too_large(Header(img.width, img.height, img.mode), max_pixels)
        if reason:
            raise DataError(f"{path}: {reason} ({limit_key})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if at_least is not None:
                    img.draft(None, (at_least, at_least))  # JPEG only; a no-op for other formats
                img.load()
        except _ERRORS as exc:
            raise _unreadable(path, exc) from None
        return img


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


def write_jpeg(path: str | os.PathLike, pixels: np.ndarray, quality: int) -> None:
    """Encode `pixels` (H x W x 3, uint8) as a baseline JPEG of `quality` into `path`."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    Path(path).write_bytes(buf.getvalue())
