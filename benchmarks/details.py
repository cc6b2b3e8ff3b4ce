"""The details benchmark: does attention sampling pay on fine-grained data?

TASN (its `master_aux` head) against the plain baseline (`model.kind: baseline`: the same shared
backbone on the image resized to `out_size`) on the embedded synthetic fine-grained set, at the
same input size, epochs and schedule, several seeds each; prints the mean and spread of top-1 on
the test split, and the training throughput. The synthetic classes differ only in small parts, so
a network that looks closer at the right places should win.

CUDA (default): the demo config (params.yaml top level: slim ResNet-18 backbones, 224 input,
112 sampled) with more epochs, 3 seeds each, sized for < 8 minutes on one H100. CPU: the smoke
profile, 1 epoch, 1 seed: a plumbing check whose accuracies mean nothing.

Runs the real stage functions (synth -> preprocess -> tasn.training.train) with MLflow off, so it needs
the package's data dependencies (numpy, pillow, pandas, pyarrow, pyyaml, tqdm) besides torch, and no
MLOps stack. `PYTHONPATH=. python benchmarks/details.py [--out FILE]` prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasn.config import load_config
from tasn.data.preprocess import preprocess
from tasn.data.synth import generate
from tasn.training import train
from tasn.training.outputs import STEPS


def prepare(profile: str | None, dest: Path) -> Path:
    """Generate the synthetic raw set and preprocess it; returns the prepared folder."""
    cfg = load_config(ROOT / "params.yaml", profile)
    generate(dest / "raw", cfg.data.synth)
    preprocess(dest / "raw", dest / "prepared", cfg.preprocess)
    return dest / "prepared"


def run_one(kind: str, seed: int, data: Path, out: Path, profile: str | None, overrides: list[str]) -> dict:
    cfg = load_config(ROOT / "params.yaml", profile, [
        f"model.kind={kind}", f"train.seed={seed}", "tracking.enabled=false", "train.picture_images=0",
        "train.checkpoint_every=0", "train.resume=never", *overrides,
    ])
    start = time.perf_counter()
    summary = train(cfg, data, out).metrics
    wall = time.perf_counter() - start
    with (out / STEPS).open() as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)][1:]  # the first interval warms up
    return {"kind": kind, "seed": seed, "top1": summary["top1"], "wall_s": wall,
            "images_per_s": statistics.median(rates) if rates else float("nan")}


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| model | top-1 mean | spread (std; min-max) | per seed | train images/s | wall s/run |",
             "|---|---:|---:|---|---:|---:|"]
    for kind, label in (("tasn", "TASN (master_aux)"), ("baseline", "baseline")):
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        acc = [r["top1"] for r in rows]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(
            f"| {label} | {statistics.mean(acc):.3f} | {std:.3f}; {min(acc):.3f}-{max(acc):.3f} | "
            + ", ".join(f"{a:.3f}" for a in acc)
            + f" | {statistics.median(r['images_per_s'] for r in rows):,.1f} | "
            f"{statistics.mean(r['wall_s'] for r in rows):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="a prepared dataset (default: generate the synthetic one)")
    ap.add_argument("--profile", default=None if cuda else "smoke",
                    help="profile over params.yaml (default: none, the demo, on CUDA; smoke on CPU)")
    ap.add_argument("--epochs", type=int, default=20 if cuda else 1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2] if cuda else [0])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    milestone = max(1, int(args.epochs * 0.75))
    overrides = [f"train.epochs={args.epochs}", f"train.milestones=[{milestone}]", *args.overrides]
    if cuda:
        overrides += ["train.batch_size=32", "train.workers=8", "evaluate.workers=8", "evaluate.batch_size=64"]
    results = []
    with tempfile.TemporaryDirectory(prefix="tasn-details-") as tmp_name:
        tmp = Path(tmp_name)
        data = args.data or prepare(args.profile, tmp / "data")
        for seed in args.seeds:
            for kind in ("tasn", "baseline"):
                r = run_one(kind, seed, data, tmp / f"{kind}-{seed}", args.profile, overrides)
                print(f"{kind} seed {seed}: top-1 {r['top1']:.3f}, {r['images_per_s']:.1f} img/s, "
                      f"{r['wall_s']:.0f} s", file=sys.stderr)
                results.append(r)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    header = (f"### Details benchmark — {device}, torch {torch.__version__}\n\n"
              f"Synthetic fine-grained set, profile {args.profile or 'demo'}, {args.epochs} epochs, "
              f"seeds {' '.join(map(str, args.seeds))}; overrides: {' '.join(overrides)}.")
    out = table(results, header)
    print(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
