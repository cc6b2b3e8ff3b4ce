"""Data-side throughput on this machine: preprocess, validate, and the training DataLoader.

    python benchmarks/loader.py [--data data/raw] [--workers 0 1 2] [--batches 20]

Runs `tasn preprocess` and `tasn validate` on the raw set (into a temporary folder, timed), then
reads the prepared train split through `PreparedDataset` + TASN's train transform with each
DataLoader worker count, and prints images/s overall and per worker process. Numbers depend on
the machine's load: run it on an idle machine and quote the core count with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasn.config import load_config
from tasn.data.dataset import PreparedDataset
from tasn.data.preprocess import preprocess
from tasn.data.transforms import train_transform
from tasn.data.validate import validate


def _loader_rate(prepared: Path, input_size: int, workers: int, batches: int, batch_size: int) -> float:
    ds = PreparedDataset(prepared, "train", train_transform(input_size, 0.4, 30.0, 0.1))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    torch.manual_seed(0)
    seen, it = 0, iter(loader)
    next(it)  # warm-up: worker start and first decode
    start = time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/raw", help="raw CUB-layout dataset (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to try")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()

    cfg = load_config(args.params)
    cores = len(os.sched_getaffinity(0))
    results: dict[str, object] = {"cores": cores, "data": args.data}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = validate(args.data, Path(tmp) / "validated", cfg.validate).summary
        seconds = time.perf_counter() - start
        results["validate_s_per_1000_images"] = round(seconds / summary["images"] * 1000, 2)
        start = time.perf_counter()
        summary = preprocess(args.data, Path(tmp) / "prepared", cfg.preprocess).summary
        seconds = time.perf_counter() - start
        results["preprocess_images_per_s"] = round(summary["images"] / seconds, 1)
        results["images"] = summary["images"]
        results["prepared_mb"] = round(summary["bytes"] / 2**20, 2)
        for workers in args.workers:
            rate = _loader_rate(Path(tmp) / "prepared", cfg.model.input_size, workers, args.batches,
                                cfg.train.batch_size)
            results[f"loader_images_per_s_workers_{workers}"] = round(rate, 1)
            results[f"loader_images_per_s_per_worker_{workers}"] = round(rate / max(1, workers), 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
