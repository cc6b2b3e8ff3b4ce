"""`PreparedDataset`: the torch Dataset over `tasn preprocess` output (shards + manifest.parquet).

A map-style dataset (len + index), so `DistributedSampler` and any sampler work on it. Shards are
memory-mapped lazily in each process that reads them (a DataLoader worker opens its own maps; the
dataset pickles without them), so many workers share the page cache instead of copying bytes.
"""

from __future__ import annotations

import io
import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from tasn.data.preprocess import CLASSES, MANIFEST
from tasn.errors import DataError, shown
from tasn.io import read_text
from tasn.paths import path_problem

SPLITS = ("train", "test")


REQUIRED = {"shard": "string", "offset": "integer", "length": "integer", "label": "integer", "split": "string"}


def read_classes(path: Path) -> list[str]:
    """classes.json: a non-empty list of class names, else a DataError naming the file."""
    try:
        classes = json.loads(read_text(path, DataError))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: expected a non-empty list of class names, got {shown(classes)}")
    return classes


def read_manifest(root: Path, num_classes: int) -> pd.DataFrame:
    """manifest.parquet, checked before any image is read through it: the columns a reader uses
    with their types, every row's offset, length, label and split in range, every shard a file
    inside `root` (`tasn.paths.path_problem`) long enough for its rows. A manifest edited by hand or by
    an attacker is refused here, naming the row, instead of failing in a loader worker."""
    path = root / MANIFEST
    try:
        manifest = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable manifest ({shown(str(exc))}); run `tasn preprocess` again") from None
    for column, kind in REQUIRED.items():
        if column not in manifest:
            raise DataError(f"{path}: no column {column!r} (columns: {shown(list(manifest.columns))})")
        check = pd.api.types.is_integer_dtype if kind == "integer" else pd.api.types.is_string_dtype
        if not check(manifest[column]) or manifest[column].isna().any():
            raise DataError(f"{path}: column {column!r} must hold {kind}s, with no empty cell")
    rules = {
        "offset": (manifest["offset"] < 0, "must be >= 0"),
        "length": (manifest["length"] <= 0, "must be > 0"),
        "label": ((manifest["label"] < 0) | (manifest["label"] >= num_classes), f"must be 0..{num_classes - 1}"),
        "split": (~manifest["split"].isin(SPLITS), f"must be one of {', '.join(SPLITS)}"),
    }
    for column, (wrong, rule) in rules.items():
        if wrong.any():
            row = int(wrong.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: row {row}: {column} {shown(manifest[column].tolist()[row])} {rule}")
    ends = (manifest["offset"] + manifest["length"]).groupby(manifest["shard"]).max()
    for shard, end in ends.items():
        problem = path_problem(root, str(shard))
        if problem:
            raise DataError(f"{path}: shard {problem}")
        size = (root / shard).stat().st_size if (root / shard).is_file() else None
        if size is None or size < end:
            raise DataError(f"{path}: shard {shard!r} is {'missing' if size is None else f'{size} bytes'}, "
                            f"but its rows reach byte {end}")
    return manifest


class PreparedDataset(Dataset):
    """Images of one split of a prepared dataset, with their 0-based labels.

    `ds[i]` is `(transform(image), label)`; with no transform the image becomes a float tensor
    (3, H, W) in [0, 1] at its prepared size. `.classes[label]` is the class name, `.labels` the
    labels in dataset order, `.records` the manifest rows (image_id, path, sizes, ...).
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        for name in (MANIFEST, CLASSES):
            if not (self.root / name).is_file():
                raise DataError(f"{self.root / name}: missing; is {self.root} the output of `tasn preprocess`?")
        self.classes: list[str] = read_classes(self.root / CLASSES)
        manifest = read_manifest(self.root, len(self.classes))
        self.records = manifest[manifest["split"] == split].reset_index(drop=True)
        self.labels: list[int] = [int(x) for x in self.records["label"]]
        self.split = split
        self.transform = transform
        self._maps: dict[str, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _bytes(self, i: int) -> bytes:
        rec = self.records.iloc[i]
        shard = rec["shard"]
        if shard not in self._maps:
            with open(self.root / shard, "rb") as fh:
                self._maps[shard] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        start = int(rec["offset"])
        return self._maps[shard][start : start + int(rec["length"])]

    def image(self, i: int) -> Image.Image:
        """The `i`-th image of the split as a PIL RGB image at its prepared size."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} {self.split} images")
        img = Image.open(io.BytesIO(self._bytes(i)))
        return img.convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.image(i)
        return (self.transform(img) if self.transform is not None else to_tensor(img)), self.labels[i]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}  # each process maps the shards itself
        return state
