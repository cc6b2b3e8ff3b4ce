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
from tasn.errors import DataError
from tasn.io import path_problem

SPLITS = ("train", "test")


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
        self.classes: list[str] = json.loads((self.root / CLASSES).read_text())
        manifest = pd.read_parquet(self.root / MANIFEST)
        for shard in manifest["shard"].unique():  # a manifest must not send a reader out of its folder
            problem = path_problem(self.root, str(shard))
            if problem:
                raise DataError(f"{self.root / MANIFEST}: shard {problem}")
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
