"""The details benchmark: does zooming into the attended parts beat a plain resize at the same size?

Three models, trained from random weights on the same split, for the same epochs, with the same
augmentation and recipe (params.yaml's top level, the CPU demo), 3 seeds each:

- **TASN** at `model.out_size` (its prediction head, `master_aux`);
- **baseline at out_size**: the same backbone on the crop resized to `out_size` — what TASN's
  sampler gives with uniform attention, the plain resize the method must beat;
- **baseline at input_size**: the same backbone on the whole `input_size` crop, every pixel — the
  ceiling, at (input_size / out_size)^2 times the backbone's cost.

It reports mean and min-max top-1 on the test split per model, and the training images/s of each,
measured in the same run on the same machine, and writes the table into benchmarks/RESULTS.md
(between the `details-results` markers) with the machine it ran on.

Data: the embedded set, read straight from the in-repo DVC remote (`dvc-storage/`, the files
`data.dvc` lists), so the benchmark runs where DVC is not installed (a GPU host that got a copy of
the working tree); then `tasn preprocess` with params.yaml's settings. `--data DIR` takes an
already prepared set instead. Needs torch, numpy, pillow, pandas, pyarrow, pyyaml and tqdm; no
MLflow, DVC, Kubeflow or great-expectations (tracking is off).

    PYTHONPATH=. python benchmarks/details.py                 # CPU or CUDA (--device auto)
    PYTHONPATH=. python benchmarks/details.py --seeds 0 --epochs 2 --results ''   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# Before torch loads OpenMP: threads that sleep rather than spin while they wait, or a CPU shared
# with other work makes every run several times slower (docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasn.config import Config, load_config
from tasn.data.dvc_remote import materialize
from tasn.data.preprocess import preprocess
from tasn.training import train
from tasn.training.outputs import CHECKPOINTS, STEPS

MARK_START, MARK_END = "<!-- details-results:start -->", "<!-- details-results:end -->"


def models(input_size: int, out_size: int) -> list[tuple[str, str, list[str]]]:
    """(key, table label, config overrides) of the three models compared."""
    return [
        ("tasn", f"TASN (master_aux) at {out_size}", ["model.kind=tasn"]),
        ("baseline", f"baseline at out_size {out_size}", ["model.kind=baseline"]),
        ("ceiling", f"baseline at input_size {input_size} (ceiling)",
         ["model.kind=baseline", f"model.out_size={input_size}"]),
    ]


def prepare(cfg: Config, dest: Path) -> Path:
    """The embedded raw set from the in-repo remote, preprocessed as `make run` does."""
    raw = materialize(ROOT / "data.dvc", ROOT / "dvc-storage", dest / "raw")
    preprocess(raw, dest / "prepared", cfg.preprocess)
    return dest / "prepared"


def run_one(data: Path, out: Path, overrides: list[str]) -> dict[str, float]:
    """Train one model (tracking off, no checkpoints kept); top-1 of its primary head and the
    median training throughput over the logged intervals, the first (warm-up) one left out."""
    cfg = load_config(ROOT / "params.yaml", None, [
        "tracking.enabled=false", "train.picture_images=0", "train.checkpoint_every=0", "train.resume=never",
        *overrides,
    ])
    start = time.perf_counter()
    metrics = train(cfg, data, out).final  # the test split's top-1 at the end (metrics.json holds losses)
    wall = time.perf_counter() - start
    with (out / STEPS).open() as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    rates = rates[1:] or rates
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return {"top1": metrics["top1"], "wall_s": wall,
            "images_per_s": statistics.median(rates) if rates else float("nan")}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(results: dict[str, list[dict[str, float]]], labels: dict[str, str]) -> str:
    lines = ["| model | top-1 mean | min-max | per seed | train images/s | wall s/run |",
             "|---|---:|---:|---|---:|---:|"]
    for key, rows in results.items():
        acc = [r["top1"] for r in rows]
        lines.append(
            f"| {labels[key]} | {statistics.mean(acc):.3f} | {min(acc):.3f}-{max(acc):.3f} | "
            + ", ".join(f"{a:.3f}" for a in acc)
            + f" | {statistics.median(r['images_per_s'] for r in rows):,.0f}"
            f" | {statistics.mean(r['wall_s'] for r in rows):.0f} |"
        )
    return "\n".join(lines)


def verdict(results: dict[str, list[dict[str, float]]]) -> str:
    """The issue's bar: TASN's mean >= 10 points above the baseline's, and min TASN > max baseline."""
    tasn, base = [r["top1"] for r in results["tasn"]], [r["top1"] for r in results["baseline"]]
    gap = statistics.mean(tasn) - statistics.mean(base)
    separated = min(tasn) > max(base)
    ok = gap >= 0.10 and separated
    return (f"TASN - baseline at the same out_size: {100 * gap:+.1f} points mean; lowest TASN seed "
            f"{'above' if separated else 'NOT above'} the highest baseline seed: "
            f"{'premise shown' if ok else 'premise NOT shown'}.")


def write_results(path: Path, block: str) -> None:
    """Replace the block between the markers (or append one) in `path`."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    wrapped = f"{MARK_START}\n{block}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + wrapped + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + wrapped + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    ap.add_argument("--data", type=Path, default=None,
                    help="a prepared dataset (default: the embedded set from dvc-storage/)")
    ap.add_argument("--epochs", type=int, default=None, help="default: train.epochs of params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    help="extra config override, for all models")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                    help="markdown file to write the table into ('' = print only; default: %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.device == "cpu":  # before anything asks CUDA: tasn.distributed takes CUDA whenever it sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(ROOT / "params.yaml", None, args.overrides)
    epochs = args.epochs if args.epochs is not None else cfg.train.epochs
    common = [f"train.epochs={epochs}", *args.overrides]
    if device.type == "cuda":  # loader processes to keep a GPU fed; the batches are the same for any count
        common = ["train.workers=8", "evaluate.workers=8", *common]
    specs = models(cfg.model.input_size, cfg.model.out_size)
    labels = {key: label for key, label, _ in specs}
    results: dict[str, list[dict[str, float]]] = {key: [] for key, _, _ in specs}
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tasn-details-") as tmp_name:
        tmp = Path(tmp_name)
        data = args.data or prepare(cfg, tmp / "data")
        for seed in args.seeds:
            for key, _, overrides in specs:
                r = run_one(data, tmp / f"{key}-{seed}", [*common, f"train.seed={seed}", *overrides])
                print(f"{key} seed {seed}: top-1 {r['top1']:.3f}, {r['images_per_s']:.0f} img/s, "
                      f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
                results[key].append(r)
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()
    m = cfg.model
    block = "\n".join([
        f"### Details benchmark — {machine(device)}, {date.today().isoformat()}",
        "",
        f"`benchmarks/details.py`: {'the embedded set' if args.data is None else args.data}, "
        "params.yaml top level "
        f"(input {m.input_size}, att {m.att_size}, out {m.out_size}, {cfg.model.backbone}, {cfg.train.optimizer} "
        f"lr {cfg.train.lr}, {cfg.train.schedule}), {epochs} epoch{'s' if epochs != 1 else ''}, "
        f"seeds {' '.join(map(str, args.seeds))}"
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
        + f"; whole benchmark {minutes:.1f} min, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.",
        "",
        table(results, labels),
        "",
        verdict(results),
    ])
    print(block)
    if args.results:
        write_results(Path(args.results), block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
