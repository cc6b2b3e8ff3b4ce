"""The image manifest: one row per listed image (and per unlisted file), built by decoding each one.

Columns: image_id, path, class_id, class_name, split, listed, exists, bytes, sha256, decodable,
error, width, height, mode, min_side, pixels, aspect, leak. It is what the great-expectations suite
runs over and what `tasn validate` saves as manifest.parquet, so a failed rule can always name its
files. Sizes come from the header; an image over the pixel limit is not decoded at all (its
`decodable` stays empty and the `max_pixels` rule names it), and a JPEG is decoded at 1/8 scale,
which reads every byte of it, so validating costs little memory whatever the image size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasn.config.schema import DEFAULT_MAX_PIXELS
from tasn.data.images import decode, read_header, too_large
from tasn.data.layout import Layout
from tasn.data.parallel import imap
from tasn.errors import DataError


@dataclass
class _Probe:
    path: str
    max_pixels: int


_PROBED = ["exists", "bytes", "sha256", "decodable", "error", "width", "height", "mode"]


def _probe(job: _Probe) -> dict:
    """Hash and decode one file; never raises for a bad image (that is a row to report)."""
    path = Path(job.path)
    if not path.is_file():
        return dict(exists=False, bytes=None, sha256=None, decodable=None, error="missing", width=None, height=None,
                    mode=None)
    raw = path.read_bytes()
    row = dict(exists=True, bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(), width=None, height=None, mode=None)
    try:
        header = read_header(path)
        row.update(width=header.width, height=header.height, mode=header.mode)
        reason = too_large(header, job.max_pixels)
        if reason:
            return {**row, "decodable": None, "error": f"not decoded: {reason}"}
        decode(path, job.max_pixels, at_least=1)
    except DataError as exc:
        return {**row, "decodable": False, "error": str(exc).split(": ", 1)[-1]}
    return {**row, "decodable": True, "error": None}


def build_manifest(layout: Layout, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> pd.DataFrame:
    """Decode every listed image and every unlisted image file under images/, in parallel."""
    listed = layout.images.copy()
    listed["listed"] = True
    unlisted = sorted(set(layout.files_on_disk()) - set(listed["path"]))
    extra = pd.DataFrame({"path": unlisted, "listed": False})
    table = pd.concat([listed, extra], ignore_index=True) if unlisted else listed
    table["image_id"] = table["image_id"].astype("Int64")
    table["class_id"] = table["class_id"].astype("Int64")
    names = dict(zip(layout.classes["class_id"], layout.classes["class_dir"]))
    table["class_name"] = [names.get(int(c)) if pd.notna(c) else None for c in table["class_id"]]
    table["split"] = [None if pd.isna(t) else ("train" if t else "test") for t in table["is_train"].astype("object")]
    table = table.drop(columns=["is_train"])
    jobs = [_Probe(str(layout.root / "images" / p), max_pixels) for p in table["path"]]
    probes = pd.DataFrame.from_records(list(imap(_probe, jobs, workers, desc="validate")), columns=_PROBED)
    table = pd.concat([table.reset_index(drop=True), probes], axis=1)
    for col in ("bytes", "width", "height"):
        table[col] = table[col].astype("Int64")
    table["exists"] = table["exists"].astype("boolean")
    table["decodable"] = table["decodable"].astype("boolean")
    table["min_side"] = table[["width", "height"]].min(axis=1, skipna=False).astype("Int64")
    table["pixels"] = (table["width"] * table["height"]).astype("Int64")
    table["aspect"] = (table[["width", "height"]].max(axis=1, skipna=False) / table["min_side"]).astype("Float64")
    splits_of = table.dropna(subset=["sha256", "split"]).groupby("sha256")["split"].nunique()
    leaks = table["sha256"].map(lambda h: bool(splits_of.get(h, 0) > 1) if isinstance(h, str) else False)
    table["leak"] = leaks.astype("boolean")
    return table
