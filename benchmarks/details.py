"""The details benchmark: does zooming into the attended parts beat a plain resize at the same size?

Three models, trained from random weights on the same split with the same defaults (params.yaml's
top level, the CPU demo), compared on the test split:

- **TASN** at `model.out_size` (its prediction head, `master_aux`);
- **resize** (the baseline at out_size): the same backbone on the crop resized to `out_size` —
  what TASN's sampler gives with uniform attention, the plain resize the method must beat;
- **full size** (the baseline at input_size): the same backbone on the whole `input_size` crop,
  every pixel — the ceiling on what the pixels hold, at (input_size / out_size)^2 times the cost.

Two modes, each writing its table into benchmarks/RESULTS.md (between its markers) with the machine:

- default: the embedded set (read straight from the in-repo DVC remote, `dvc-storage/`, so the
  benchmark runs where DVC is not installed), 3 seeds, mean and min-max per model;
- `--suite`: the details sets of `SUITE` (`tasn data details`, generated here), one seed each,
  then the embedded set with its 3 seeds. A set counts where the full-size baseline reaches at
  least twice chance (the pixels hold the class and the defaults can learn it); on it TASN must
  beat the resize by at least 10 points.

Needs torch, numpy, pillow, pandas, pyarrow, pyyaml and tqdm; no MLflow, DVC, Kubeflow or
great-expectations (tracking is off).

    PYTHONPATH=. python benchmarks/details.py                 # the embedded set, CPU or CUDA
    PYTHONPATH=. python benchmarks/details.py --suite         # every set (about an hour on 2 cores)
    PYTHONPATH=. python benchmarks/details.py --suite --sets shape8 --models tasn --results '' \\
        --log runs.jsonl -S train.lr=0.05                     # one cell of a search
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: threads that sleep rather than spin while they wait, or a CPU shared
# with other work makes every run several times slower (docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasn.config import Config, DetailsConfig, load_config
from tasn.data import details
from tasn.data.dvc_remote import materialize
from tasn.data.preprocess import preprocess
from tasn.training import train
from tasn.training.outputs import HISTORY, STEPS

MARK_START, MARK_END = "<!-- details-results:start -->", "<!-- details-results:end -->"
SUITE_START, SUITE_END = "<!-- details-suite:start -->", "<!-- details-suite:end -->"
MODELS = ("tasn", "baseline", "ceiling")


@dataclass(frozen=True)
class DetailsSet:
    name: str
    why: str  # what the set stands for
    cfg: DetailsConfig


def _set(name: str, why: str, classes: int, per_class: int, period: float, share: float, cue: str) -> DetailsSet:
    test = round(per_class * 0.25)  # import-folder's default test fraction
    return DetailsSet(name, why, DetailsConfig(classes=classes, train_per_class=per_class - test, test_per_class=test,
                                               period=period, part_share=share, cue=cue))  # type: ignore[arg-type]


# Chosen to span the issue's axes (texture period 2-8 px, the part's share 1-20 %, a coarse cue of
# each kind or none, 4-16 classes, 50-300 images per class) in few sets; none was used to tune
# anything alone.
SUITE = (
    _set("large4", "4 textures of 5-6 px on a large blob among clutter (the texture set of the recipe's notes)",
         4, 250, 5.5, 0.15, "blob"),
    _set("shape8", "outline x texture, 4 px, a mid-size part: a coarse cue holds half the class", 8, 150, 4.0, 0.06,
         "shape"),
    _set("small8", "8 textures of 2.5 px on a small part (2 %) on a card, 100 images per class", 8, 100, 2.5, 0.02,
         "card"),
    _set("many16", "16 classes (4 outlines x 4 textures) of 3 px, 60 images per class", 16, 60, 3.0, 0.05, "shape"),
    _set("nocue4", "no coarse cue: a zero-mean 7 px texture over the clutter, 300 images per class", 4, 300, 7.0,
         0.08, "none"),
    _set("few6", "6 textures of 6 px on a blob of 20 %, 50 images per class", 6, 50, 6.0, 0.20, "blob"),
)
SETS = {s.name: s for s in SUITE}


# What only TASN reads: a change of these leaves the baselines' runs comparable.
TASN_ONLY = {"model": ("att_backbone", "att_head_channels", "att_size", "att_stride", "dense", "iters",
                       "structure_power", "detail_power", "att_pretrained"),
             "train": ("attention_first",)}


def recipe_id(cfg: Config, model: str = "tasn") -> str:
    """What makes two logged runs of `model` comparable: the whole config but the model kind and
    size and the seed, and for the baselines what only TASN reads (its loss, attention net, sampler)."""
    d = cfg.to_dict()
    for section, key in (("model", "kind"), ("model", "out_size"), ("train", "seed")):
        d[section].pop(key)
    if model != "tasn":
        d.pop("loss")
        for section, keys in TASN_ONLY.items():
            for key in keys:
                d[section].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def model_overrides(key: str, input_size: int) -> list[str]:
    return {"tasn": ["model.kind=tasn"], "baseline": ["model.kind=baseline"],
            "ceiling": ["model.kind=baseline", f"model.out_size={input_size}"]}[key]


def labels(input_size: int, out_size: int) -> dict[str, str]:
    return {"tasn": f"TASN (master_aux) at {out_size}", "baseline": f"baseline at out_size {out_size}",
            "ceiling": f"baseline at input_size {input_size} (ceiling)"}


def prepare_embedded(cfg: Config, dest: Path) -> Path:
    """The embedded raw set from the in-repo remote, preprocessed as `make run` does."""
    raw = materialize(ROOT / "data.dvc", ROOT / "dvc-storage", dest / "raw")
    preprocess(raw, dest / "prepared", cfg.preprocess)
    return dest / "prepared"


def set_key(cfg: Config, dset: DetailsSet) -> str:
    """The set's name and a digest of what its images depend on: its settings, preprocessing, the generator."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(dset.cfg), dataclasses.asdict(cfg.preprocess),
                                        Path(details.__file__).read_text()], sort_keys=True).encode())
    return f"{dset.name}-{digest.hexdigest()[:10]}"


def prepare_set(cfg: Config, dset: DetailsSet, work: Path) -> Path:
    """The set generated and preprocessed under `work` (kept there: a later run of the same key reuses it)."""
    dest = work / set_key(cfg, dset)
    if not (dest / "prepared" / "summary.json").is_file():
        details.generate(dest / "raw", dset.cfg, workers=0)
        preprocess(dest / "raw", dest / "prepared", cfg.preprocess)
        shutil.rmtree(dest / "raw")
    return dest / "prepared"


def run_one(data: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Train one model (tracking off, no checkpoints kept); its final metrics, the median training
    throughput over the logged intervals (the first, warm-up, one left out) and the wall time."""
    cfg = load_config(ROOT / "params.yaml", None, [
        "tracking.enabled=false", "train.picture_images=0", "train.checkpoint_every=0", "train.resume=never",
        *overrides,
    ])
    start = time.perf_counter()
    result = train(cfg, data, out)
    metrics = {**result.metrics, **result.final}  # metrics.json's losses and budget, the test split's top-1s
    wall = time.perf_counter() - start
    with (out / STEPS).open() as fh:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(fh)]
    rates = rates[1:] or rates
    with (out / HISTORY).open() as fh:  # the learning curve, for the log
        curve = [{k: round(float(v), 4) for k, v in row.items() if k.endswith(("loss", "top1")) or k == "step"}
                 for row in csv.DictReader(fh)]
    shutil.rmtree(out, ignore_errors=True)
    return {**metrics, "wall_s": wall, "images_per_s": statistics.median(rates) if rates else float("nan"),
            "curve": curve}


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
    threads = torch.get_num_threads()
    return f"CPU ({cpu}), {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"


def table(results: dict[str, list[dict[str, Any]]], names: dict[str, str]) -> str:
    lines = ["| model | top-1 mean | min-max | per seed | train images/s | wall s/run |",
             "|---|---:|---:|---|---:|---:|"]
    for key, rows in results.items():
        if not rows:
            continue
        acc = [r["top1"] for r in rows]
        lines.append(
            f"| {names[key]} | {statistics.mean(acc):.3f} | {min(acc):.3f}-{max(acc):.3f} | "
            + ", ".join(f"{a:.3f}" for a in acc)
            + f" | {statistics.median(r['images_per_s'] for r in rows):,.0f}"
            f" | {statistics.mean(r['wall_s'] for r in rows):.0f} |"
        )
    return "\n".join(lines)


def verdict(results: dict[str, list[dict[str, Any]]]) -> str:
    """The embedded set's bar: TASN >= 10 points over the resize on every seed (each seed's TASN
    against the same seed's resize), and its mean gap."""
    tasn = [r["top1"] for r in results.get("tasn", [])]
    base = [r["top1"] for r in results.get("baseline", [])]  # either may not have been asked for
    if not tasn or not base:
        return ""
    gaps = [t - b for t, b in zip(tasn, base)]
    ok = min(gaps) >= 0.10
    return (f"TASN - baseline at the same out_size: {100 * statistics.mean(gaps):+.1f} points mean, "
            f"per seed {', '.join(f'{100 * g:+.1f}' for g in gaps)}: "
            f"{'premise shown on every seed' if ok else 'premise NOT shown on every seed'}.")


def suite_row(dset: DetailsSet, res: dict[str, dict[str, Any]]) -> str:
    """One set's line: the three top-1s, chance, the gap, and whether the set counts / passes."""
    c = dset.cfg
    chance = 1 / c.classes
    top = {k: res[k]["top1"] if k in res else math.nan for k in MODELS}
    counts = top["ceiling"] >= 2 * chance
    gap = top["tasn"] - top["baseline"]
    if math.isnan(gap) or math.isnan(top["ceiling"]):
        result = "incomplete" if res else "not run"
    elif not counts:
        result = "does not count (full size < 2x chance)"
    else:
        result = "**pass**" if gap >= 0.10 else "**FAIL**"
    first = next(iter(res.values()), {})
    steps, epochs = first.get("steps", ""), first.get("epochs", "")
    wall = sum(r["wall_s"] for r in res.values()) / 60
    loads = [x for r in res.values() for x in (r["load_before"], r["load_after"])]
    when = f"{wall:.0f} min, load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    def shown(x: float, fmt: str) -> str:
        return "-" if math.isnan(x) else format(x, fmt)

    return (f"| {dset.name} | {dset.why} | {c.classes} x {c.train_per_class + c.test_per_class} | {c.period:g} | "
            f"{100 * c.part_share:g} % | {c.cue} | {chance:.3f} | {f'{steps} ({epochs})' if first else '-'} | "
            f"{shown(top['tasn'], '.3f')} | {shown(top['baseline'], '.3f')} | {shown(top['ceiling'], '.3f')} | "
            f"{shown(100 * gap, '+.1f')} | {result} | {when or '-'} |")


SUITE_HEADER = ("| set | what it stands for | classes x images | period px | part | cue | chance | steps (epochs) | "
                "TASN | resize | full size | TASN - resize, points | verdict | its runs: wall, load |\n"
                "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---|---|")


def write_results(path: Path, block: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace the block between the markers (or append one) in `path`."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    wrapped = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + wrapped + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + wrapped + "\n"
    path.write_text(text)


class Runner:
    """Trains the requested models on a dataset, appending every run to the log (JSON lines)."""

    def __init__(self, common: list[str], recipe: dict[str, str], input_size: int, models: list[str],
                 log: Path | None, tmp: Path):
        self.common, self.recipe, self.input_size, self.models, self.log, self.tmp = (
            common, recipe, input_size, models, log, tmp)

    def run(self, data: Path | None, dataset: str, seed: int) -> dict[str, dict[str, Any]]:
        assert data is not None
        out: dict[str, dict[str, Any]] = {}
        for key in self.models:
            load = os.getloadavg()[0]
            r = run_one(data, self.tmp / f"{dataset}-{key}-{seed}",
                        [*self.common, f"train.seed={seed}", *model_overrides(key, self.input_size)])
            r["load_before"], r["load_after"] = load, os.getloadavg()[0]
            print(f"{dataset} {key} seed {seed}: top-1 {r['top1']:.3f}, train loss {r['train_loss']:.3f}, "
                  f"{r['steps']} steps, {r['images_per_s']:.0f} img/s, {r['wall_s']:.0f} s, load {load:.1f}",
                  file=sys.stderr, flush=True)
            if self.log:
                with self.log.open("a") as fh:
                    fh.write(json.dumps({"time": datetime.now().isoformat(timespec="seconds"), "data": dataset,
                                         "set": dataset.rsplit("-", 1)[0],
                                         "model": key, "seed": seed, "overrides": self.common,
                                         "recipe": self.recipe[key], **r}, default=str) + "\n")
            out[key] = r
        return out


class LogReader:
    """Results read back from a `--log` file instead of trained: for each (set, model, seed) the
    latest run logged with the same recipe (params.yaml and overrides), so a suite too long for one sitting on a shared
    machine can be run set by set and tabled together (each row keeps its own time and load)."""

    def __init__(self, path: Path, recipe: dict[str, str], models: list[str]):
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.recipe, self.models = recipe, models

    def run(self, data: Path | None, dataset: str, seed: int) -> dict[str, dict[str, Any]]:
        found = {}
        for r in self.rows:
            if r["model"] in self.models and (r.get("data"), r["seed"], r.get("recipe")) == (
                    dataset, seed, self.recipe[r["model"]]):
                found[r["model"]] = r  # the latest wins
        return {key: found[key] for key in self.models if key in found}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    ap.add_argument("--data", type=Path, default=None,
                    help="a prepared dataset (default: the embedded set from dvc-storage/)")
    ap.add_argument("--suite", action="store_true", help="the details sets of SUITE, then the embedded set")
    ap.add_argument("--sets", nargs="+", choices=[*SETS, "embedded"], default=None,
                    help="with --suite: only these sets ('embedded' = the embedded set)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=None, help="default: train.epochs of params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="of the embedded set (default: 0 1 2)")
    ap.add_argument("--suite-seed", type=int, default=0, help="training seed on the details sets")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    help="extra config override, for all models")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep generated details sets here and reuse them (default: a temporary folder)")
    ap.add_argument("--log", type=Path, default=None, help="append every run's metrics here (JSON lines)")
    ap.add_argument("--from-log", type=Path, default=None, metavar="LOG",
                    help="train nothing: table the latest runs of LOG made with the same params and overrides")
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
    common = [*([f"train.epochs={args.epochs}"] if args.epochs is not None else []), *args.overrides]
    if device.type == "cuda":  # loader processes to keep a GPU fed; the batches are the same for any count
        common = ["train.workers=8", "evaluate.workers=8", *common]
    m = cfg.model
    names = labels(m.input_size, m.out_size)
    load_before = os.getloadavg()
    start = time.perf_counter()
    suite_rows: list[str] = []
    embedded: dict[str, list[dict[str, Any]]] = {key: [] for key in args.models}
    wanted = args.sets or ([*SETS, "embedded"] if args.suite else ["embedded"])
    with tempfile.TemporaryDirectory(prefix="tasn-details-") as tmp_name:
        tmp = Path(tmp_name)
        run_cfg = load_config(ROOT / "params.yaml", None, common)
        recipe = {key: recipe_id(run_cfg, key) for key in MODELS}
        runner: Runner | LogReader = (LogReader(args.from_log, recipe, args.models) if args.from_log else
                                      Runner(common, recipe, m.input_size, args.models, args.log, tmp))
        work = args.work or tmp / "sets"
        for name in wanted:
            if name != "embedded":
                dset = SETS[name]
                data = None if args.from_log else prepare_set(cfg, dset, work)
                suite_rows.append(suite_row(dset, runner.run(data, set_key(cfg, dset), args.suite_seed)))
                continue
            data = None if args.from_log else args.data or prepare_embedded(cfg, tmp / "data")
            for seed in args.seeds:
                for key, r in runner.run(data, "embedded", seed).items():
                    embedded[key].append(r)
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()
    t = cfg.train
    settings = (f"input {m.input_size}, att {m.att_size} at stride {m.att_stride}, out {m.out_size}, maps at the "
                f"powers {m.structure_power:g} and {m.detail_power:g}, {m.backbone}, "
                f"{t.optimizer} lr {t.lr:g}, {t.schedule}, {t.epochs} epochs and at least {t.min_steps} steps, "
                f"the attention net alone for the first {t.attention_first:g} of them")
    where = (f"{machine(device)}, {date.today().isoformat()}; params.yaml top level ({settings})"
             + (f", overrides {' '.join(args.overrides)}" if args.overrides else "")
             + (f"; tabled from the runs logged in {args.from_log.name}, each row with its own time and load."
                if args.from_log else f"; whole benchmark {minutes:.1f} min, load average {load_before[0]:.1f} "
                                      f"before, {load_after[0]:.1f} after."))
    blocks = []
    if suite_rows:
        blocks.append((SUITE_START, SUITE_END, "\n".join([
            f"### Details suite — {where}", "", SUITE_HEADER, *suite_rows])))
    if any(embedded.values()):
        blocks.append((MARK_START, MARK_END, "\n".join([
            f"### Details benchmark, the embedded set — {where}", "",
            f"Seeds {' '.join(map(str, args.seeds))}" + (f", data {args.data}" if args.data else "") + ".", "",
            table(embedded, names), "", verdict(embedded)])))
    for start_mark, end_mark, block in blocks:
        print(block)
        if args.results:
            write_results(Path(args.results), block, start_mark, end_mark)
    return 0


if __name__ == "__main__":
    sys.exit(main())
