"""`tasn preprocess`: raw CUB layout -> compact shards a DataLoader reads fast (no bounding boxes).

Each image is decoded, EXIF-oriented, converted to RGB, resized so its shorter side is
`preprocess.size` (aspect kept; TASN crops `model.input_size` from it at train time) and re-encoded
as JPEG. The JPEG bytes are concatenated into a few shard files (`shards/shard-00000.bin`, ...) and
`manifest.parquet` says where each image lives (shard, offset, length) with its id, split, label
and sizes. One open file per shard, no directory walk, no per-image files: fast to copy, to DVC-track
and to read from many loader processes. The output directory is replaced atomically (temporaries
of killed runs are swept first), and the same input and config give byte-identical output.

Limits, from each image's header before it is decoded: at most `preprocess.max_pixels`, and a
resized size JPEG can hold. A JPEG much larger than `size` is decoded by libjpeg at 1/2, 1/4 or
1/8 scale (never below `size`), so a worker holds a few MB for an 8000 x 6000 photo, not 150.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from tasn import lineage
from tasn.config import PreprocessConfig, check
from tasn.config.schema import JPEG_MAX_SIDE
from tasn.data.images import decode, read_header, to_rgb
from tasn.data.layout import check_layout, read_layout
from tasn.data.parallel import imap
from tasn.errors import DataError
from tasn.io import atomic_dir, atomic_write_json, check_apart

log = logging.getLogger(__name__)

SHARD_BYTES = 256 * 2**20  # a new shard starts past this size
MANIFEST = "manifest.parquet"  # where each image lives (shard, offset, length), its split, label, sizes
CLASSES = "classes.json"  # class names in label order
SUMMARY = "summary.json"  # counts and settings (a KFP Metrics artifact)
SHARDS = "shards"  # folder of shard-<n>.bin: the JPEG bytes, concatenated


@dataclass(frozen=True)
class PreprocessResult:
    out_dir: Path
    summary: dict[str, Any]  # what summary.json holds


def shard_name(index: int) -> str:
    return f"{SHARDS}/shard-{index:05d}.bin"


@dataclass
class _Job:
    path: str
    size: int
    quality: int
    max_pixels: int


def shorter_side_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is `size`, keeping the aspect ratio."""
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _process(job: _Job) -> tuple[bytes, int, int, int, int, str, str]:
    """One image: checked against the limits from its header, decoded (a large JPEG at a reduced
    scale that is still >= `size`), oriented, converted to RGB, resized, JPEG-encoded."""
    path = Path(job.path)
    header = read_header(path)
    w0, h0 = header.width, header.height
    new = shorter_side_to(w0, h0, job.size)
    if max(new) > JPEG_MAX_SIDE:
        raise DataError(f"{path}: {w0}x{h0} px would become {new[0]}x{new[1]} px at preprocess.size {job.size}, "
                        f"more than JPEG's {JPEG_MAX_SIDE} px (validate.max_aspect_ratio keeps such images out)")
    img = decode(path, job.max_pixels, at_least=job.size, limit_key="preprocess.max_pixels")
    stored = img.size
    rgb = to_rgb(img)
    target = new if rgb.size == stored else (new[1], new[0])  # EXIF orientation turned it
    out = rgb if rgb.size == target else rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=None)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=job.quality)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return buf.getvalue(), out.width, out.height, w0, h0, header.mode, sha


def preprocess(data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               cfg: PreprocessConfig) -> PreprocessResult:
    """Write the shards, `manifest.parquet`, `classes.json` and `summary.json` to `out_dir`.

    A broken input (layout inconsistency, an undecodable image) raises DataError naming the file,
    and `out_dir` is left as it was.
    """
    check(cfg, "preprocess.")
    check_apart(data_dir, out_dir, DataError, "--out")
    layout = read_layout(data_dir)
    check_layout(layout)
    if layout.images.empty:
        raise DataError(f"{layout.root / 'images.txt'}: lists no images")
    table = layout.images.sort_values("image_id").reset_index(drop=True)
    names = layout.class_names()
    label_of = {cid: k for k, cid in enumerate(sorted(layout.classes["class_id"]))}
    jobs = [_Job(str(layout.root / "images" / p), cfg.size, cfg.jpeg_quality, cfg.max_pixels) for p in table["path"]]
    out_dir = Path(out_dir)
    records = []
    with atomic_dir(out_dir) as tmp:
        (tmp / SHARDS).mkdir()
        shard, shard_file, offset = -1, None, SHARD_BYTES
        try:
            for row, result in zip(table.itertuples(), imap(_process, jobs, cfg.workers, desc="preprocess")):
                data, w, h, w0, h0, mode, sha = result
                if offset + len(data) > SHARD_BYTES and offset > 0:
                    if shard_file:
                        shard_file.close()
                    shard, offset = shard + 1, 0
                    shard_file = open(tmp / shard_name(shard), "wb")
                assert shard_file is not None  # the first image always starts a shard (offset = SHARD_BYTES)
                shard_file.write(data)
                label = label_of[int(row.class_id)]
                records.append(
                    dict(image_id=int(row.image_id), path=row.path, label=label, class_name=names[label],
                         split="train" if row.is_train else "test", shard=shard_name(shard),
                         offset=offset, length=len(data), width=w, height=h,
                         source_width=w0, source_height=h0, source_mode=mode, source_sha256=sha)
                )
                offset += len(data)
        finally:
            if shard_file:
                shard_file.close()
        manifest = pd.DataFrame.from_records(records)
        manifest.to_parquet(tmp / MANIFEST, index=False)
        atomic_write_json(tmp / CLASSES, names)
        summary = {
            "images": len(manifest),
            "train": int((manifest["split"] == "train").sum()),
            "test": int((manifest["split"] == "test").sum()),
            "classes": len(names),
            "size": cfg.size,
            "jpeg_quality": cfg.jpeg_quality,
            "shards": shard + 1,
            "bytes": int(manifest["length"].sum()),
            "source": str(Path(data_dir)),
            lineage.DATA_VERSION_KEY: lineage.data_version(data_dir),  # the raw data's, for train's lineage
        }
        atomic_write_json(tmp / SUMMARY, summary)
    log.info("preprocessed %d images into %s", len(manifest), out_dir)
    return PreprocessResult(out_dir, summary)
