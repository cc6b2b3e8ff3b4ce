"""What the training stage leaves in its output folder, and the result it returns.

Every file name is a constant here (the CLI, dvc.yaml, the KFP components and the tests use them).
Checkpoints and pictures are written during the run. At its end rank 0 writes the rest as one
unit: model.pt, metrics.json, run.json and the curves go into a staging folder beside the output
folder, which then replaces it in one step (`tasn.io.atomic_dir`), the checkpoints and pictures
carried over as hard links. A kill or a full disk at any point therefore leaves either the previous
run's outputs or this run's, never one run's model beside another's metrics. metrics.json and
run.json also record the model's sha256 (`MODEL_SHA256`): `tasn evaluate --run-json` and `tasn
register` check it, so a model and numbers of different runs can never be registered together.
The model is also logged to the MLflow run, as the servable pyfunc of `tasn.serving` whose weights
are this model.pt, and `run.json` says where that run and that model live.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasn import checkpoint, viz
from tasn.config import Config
from tasn.io import MODEL_SHA256, atomic_dir, atomic_write_json, atomic_write_text, file_sha256
from tasn.model.network import Network
from tasn.predict import Predictor
from tasn.serving import log_model
from tasn.tracking import Run, RunInfo

MODEL = "model.pt"  # weights + resolved config + class names (tasn.checkpoint.load_model reads it)
METRICS = "metrics.json"  # what training alone measures (DVC metrics:); the test split's are evaluate's
RUN = "run.json"  # tasn.tracking.RunInfo: the MLflow run and the logged model's URI
HISTORY = "history.csv"  # one row per epoch (DVC plots:)
STEPS = "steps.csv"  # one row per logged optimizer step
CURVES = "learning_curves.png"
CHECKPOINTS = "checkpoints"  # folder of ckpt-<step>.pt (train.checkpoint_dir, when set, instead)
PICTURES = "pictures"  # folder of attention_epoch_<n>.png
ATTENTION_ARTIFACTS = "attention"  # the same pictures' folder in the MLflow run
LOGGED_FILES = (METRICS, HISTORY, CURVES)  # also logged as artifacts of the MLflow run
FINAL_FILES = (MODEL, METRICS, RUN, HISTORY, STEPS, CURVES)  # written together at the end (the rest is carried over)


def picture_name(epoch: int) -> str:
    """The attention picture of a 1-based epoch."""
    return f"attention_epoch_{epoch:03d}.png"


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns on every rank: the output folder, metrics.json, run.json, and the last
    evaluation on the test split."""

    out_dir: Path
    metrics: dict[str, Any]  # what metrics.json holds
    run: RunInfo  # what run.json holds
    final: dict[str, Any]  # each head's top-1 on the test split at the end, the primary head's as top1

    def summary(self) -> dict[str, Any]:
        """All of the above, plus the output folder: what `tasn train` prints."""
        return {**self.final, **self.metrics, **self.run.to_dict(), "out": str(self.out_dir)}


def train_metrics(train_loss: float, metrics: dict[str, float], epochs: int, steps: int) -> dict[str, Any]:
    """metrics.json: what only training measures. The last loss on each split, and how far the
    run got (less than the config says when train.max_steps stops it; the whole count, resumptions
    included, when it was killed and resumed). The test split's accuracies are not repeated here:
    `tasn evaluate` measures them on the deployable model, and `dvc metrics show` / `dvc exp show`
    would show each twice."""
    return {"train_loss": train_loss, "val_loss": metrics.get("val_loss"), "epochs": epochs, "steps": steps}


def csv_text(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out_dir: Path, model: Network, cfg: Config, classes: list[str], metrics: dict[str, float],
                  train_loss: float, history: list[dict[str, Any]], steps: list[dict[str, Any]], step: int,
                  run: Run | None) -> TrainResult:
    """Rank 0, at the end: model.pt, metrics.json, history.csv, steps.csv, the learning curves, the
    MLflow model (when tracked) and run.json, swapped in together (see the module docstring)."""
    with atomic_dir(out_dir) as tmp:
        checkpoint.save_model(str(tmp / MODEL), model, cfg.to_dict(), classes, epochs=len(history), steps=step)
        digest = file_sha256(tmp / MODEL)
        primary = str(model.primary_head)
        summary = {**train_metrics(train_loss, metrics, len(history), step), MODEL_SHA256: digest}
        final = {**{k: v for k, v in metrics.items() if k != "val_loss"}, "top1": metrics.get(f"{primary}_top1"),
                 "primary_head": primary, "kind": cfg.model.kind}
        atomic_write_json(tmp / METRICS, summary)
        atomic_write_text(tmp / HISTORY, csv_text(history))
        atomic_write_text(tmp / STEPS, csv_text(steps))
        if history:
            viz.save_figure(viz.learning_curves(history, primary), tmp / CURVES)
        info = RunInfo()
        if run is not None:
            for name in LOGGED_FILES:
                if (tmp / name).exists():
                    run.log_artifact(tmp / name)
            predictor = Predictor(model.cpu(), classes, cfg.model.input_size, cfg.preprocess.size)
            logged = run.log_model(lambda: log_model(tmp / MODEL, predictor, name=cfg.register.model_name,
                                                     step=step))
            info = RunInfo(run.run_id, run.experiment_id, run.uri, logged.model_uri if logged else None)
        atomic_write_json(tmp / RUN, {**info.to_dict(), MODEL_SHA256: digest})
        carry_over(out_dir, tmp, skip=FINAL_FILES)
    return TrainResult(out_dir, summary, info, final)


def carry_over(old: Path, new: Path, skip: tuple[str, ...]) -> None:
    """Hard-link what `old` holds (checkpoints, pictures, anything else) into `new`, but for the
    names in `skip`; copy where a link cannot be made. `old` is left as it was."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst)
