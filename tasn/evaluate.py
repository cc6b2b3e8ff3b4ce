"""`tasn evaluate`: the test split through a trained model, every number a reviewer asks for.

Why these numbers: TASN has five heads and the authors report `master_aux` (the shared head on the
structure-preserved image), so every head's top-1 is reported, the primary head's top-k too, and
`top1`/`top5` repeat the model's primary head, which makes a TASN run and a baseline run directly
comparable in the MLflow UI. The distillation gap (how often master and part agree, and KL(part ||
master) at T = 1 and at the training temperature) shows whether the feature distiller did its job.
Throughput and latency are measured on the deployable path, the `Predictor`'s forward (what `tasn
predict` and a server run), on this machine.

Outputs (written together, atomically): `metrics.json` (flat numbers, DVC `metrics:`),
`evaluated.json` (the model evaluated and its sha256, which `tasn register` checks against train's
run.json),
`per_class.csv` and `confusion.csv` (DVC `plots:`; the latter one row per image, `actual` and
`predicted`, as DVC's confusion template wants), `confusion.png`. With a run id they are also logged
to that MLflow run: metrics prefixed `test_`, files under `evaluate/`. The metrics are logged
against the run's LoggedModel (the model the run logged, or the MLflow model evaluated) and the
run's dataset, so the model's page, and through it the registered version's, shows them.

Every model is loaded the same way, without unpickling or running code from the registry: a
`model.pt` by `tasn.predict.from_checkpoint`, an MLflow model by `tasn.predict.load_predictor`
(which reads its model.pt artifact with the same loader).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader
from tqdm import tqdm

from tasn import storage, tracking, viz
from tasn.config import Config, check
from tasn.data.dataset import PreparedDataset
from tasn.data.transforms import eval_transform
from tasn.errors import DataError, ServiceError, TASNError
from tasn.io import (
    EVALUATED,
    MODEL_SHA256,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_apart,
    check_same_model,
    file_sha256,
    output_lock,
    read_json,
)
from tasn.model.network import Network
from tasn.predict import Predictor, from_checkpoint, load_predictor
from tasn.redact import redact_text

log = logging.getLogger(__name__)

METRICS = "metrics.json"  # flat numbers (DVC metrics:)
PER_CLASS = "per_class.csv"  # support, correct and accuracy per class (DVC plots:)
CONFUSION_CSV = "confusion.csv"  # one row per test image: actual, predicted (DVC's confusion template)
CONFUSION_PNG = "confusion.png"
RUN_ARTIFACTS = "evaluate"  # the folder the files go to in the MLflow run


@dataclass(frozen=True)
class EvaluateResult:
    out_dir: Path
    metrics: dict[str, float]  # what metrics.json holds
    run_id: str | None  # the MLflow run the results were logged to


@dataclass
class Loaded:
    """A model ready to evaluate, whatever it was loaded from."""

    predictor: Predictor
    temperature: float  # the distillation temperature it was trained with
    run_id: str | None  # the MLflow run that produced it, when known
    model_id: str | None  # its MLflow LoggedModel, when it is one
    sha256: str | None  # of its model.pt (what train's metrics.json and run.json record)


def load(model: str, cfg: Config) -> Loaded:
    """A `model.pt` path (local or s3://) or an MLflow model URI -> Loaded; clear errors."""
    if tracking.is_mlflow_uri(model):
        try:
            found = load_predictor(model)
        except TASNError:
            raise
        except Exception as exc:  # MLflow raises several types for a wrong URI
            raise TASNError(f"--model {model}: cannot load the model from MLflow ({exc})") from exc
        return Loaded(found.predictor, _temperature(found.predictor, cfg), found.run_id, found.model_id, found.sha256)
    if "://" not in model and not Path(model).is_file():
        raise DataError(f"--model {model}: no such checkpoint file (run `tasn train` first)")
    endpoint = cfg.tracking.s3_endpoint or None
    try:
        predictor = from_checkpoint(model, endpoint=endpoint)
        raw = storage.read_bytes(model, endpoint) if "://" in model else None
        digest = file_sha256(model) if raw is None else hashlib.sha256(raw).hexdigest()
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"--model {model}: {exc}") from exc
    return Loaded(predictor, _temperature(predictor, cfg), None, None, digest)


def _temperature(predictor: Predictor, cfg: Config) -> float:
    """The distillation temperature the model was trained with (its config), else the config's."""
    trained = (predictor.config or {}).get("loss", {}).get("temperature")
    return float(trained if trained is not None else cfg.loss.temperature)


def load_test_split(data_dir: str | os.PathLike[str], predictor: Predictor) -> PreparedDataset:
    """The prepared test split with the evaluation crop; checks it is there and matches the model."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such directory (run `tasn preprocess` first)")
    ds = PreparedDataset(data_dir, "test", eval_transform(predictor.input_size))
    if len(ds) == 0:
        raise DataError(f"{data_dir}: the test split is empty: nothing to evaluate")
    if list(ds.classes) != list(predictor.classes):
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(predictor.classes, ds.classes)) if a != b][:3]
        raise DataError(
            f"class mismatch between the model ({len(predictor.classes)} classes) and {data_dir} "
            f"({len(ds.classes)} classes)" + (f"; first differences (index, model, data): {diff}" if diff else "")
        )
    return ds


@torch.inference_mode()
def collect_logits(net: Network, ds: PreparedDataset, batch_size: int, workers: int,
                   device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every head's logits (float32, CPU) over `ds`, and the labels."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    heads: dict[str, list[torch.Tensor]] = {h: [] for h in net.heads}
    labels = []
    for x, y in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=None):  # quiet off a terminal
        out = net(x.to(device))
        for h in net.heads:
            heads[h].append(getattr(out, h).float().cpu())
        labels.append(y)
    return {h: torch.cat(v) for h, v in heads.items()}, torch.cat(labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hit.double().mean())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(actual, predicted) counts."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def distillation_gap(part: torch.Tensor, master: torch.Tensor, temperature: float) -> dict[str, float]:
    """Agreement of the argmaxes and mean KL(part || master) at T = 1 and at `temperature`."""

    def kl(t: float) -> float:
        log_p = F.log_softmax(part / t, dim=1)
        log_q = F.log_softmax(master / t, dim=1)
        return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())

    return {
        "distill_agreement": float((part.argmax(1) == master.argmax(1)).double().mean()),
        "distill_kl_t1": kl(1.0),
        "distill_kl_t": kl(temperature),
    }


@torch.inference_mode()
def time_forward(predictor: Predictor, batch_size: int, batches: int, device: torch.device) -> dict[str, float]:
    """Images/s at `batch_size` and single-image latency (median, p90) of the Predictor's forward,
    on random input after one warm-up call each."""
    size = predictor.input_size
    x = torch.randn(batch_size, 3, size, size, device=device)
    one = x[:1]
    runs = max(1, batches)

    def clock(inp: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predictor(inp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    clock(x)
    total = sum(clock(x) for _ in range(runs))
    clock(one)
    lat = sorted(clock(one) for _ in range(max(3, runs)))
    return {
        "throughput_ips": batch_size * runs / total,
        "latency_ms_p50": 1000 * statistics.median(lat),
        "latency_ms_p90": 1000 * lat[min(len(lat) - 1, int(round(0.9 * (len(lat) - 1))))],
    }


def compute_metrics(heads: dict[str, torch.Tensor], labels: torch.Tensor, primary: str, topk: int,
                    temperature: float) -> dict[str, float]:
    """Flat metrics from the logits: each head's top-1, the primary head's top-k and its top-1 and
    top-5 as top1/top5, the distillation gap when the model has part and master heads, and the
    number of test images. (The other heads' top-k say little the distillation gap does not, and
    would widen `dvc metrics show` by a column each.)
    Settings are no metrics (the temperature, the timing batch size and the class count are the
    run's params and the data's), so `dvc metrics diff` shows only what was measured."""
    m: dict[str, float] = {}
    for head, logits in heads.items():
        m[f"{head}_top1"] = topk_accuracy(logits, labels, 1)
    m[f"{primary}_top{topk}"] = topk_accuracy(heads[primary], labels, topk)
    m["top1"] = m[f"{primary}_top1"]
    m["top5"] = topk_accuracy(heads[primary], labels, 5)
    if "part" in heads and "master" in heads:
        m.update(distillation_gap(heads["part"], heads["master"], temperature))
    m["num_test"] = float(len(labels))  # what the numbers are over: it moves with the data
    return m


def per_class_csv(conf: torch.Tensor, classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_id", "class_name", "support", "correct", "accuracy"])
    for i, name in enumerate(classes):
        support, correct = int(conf[i].sum()), int(conf[i, i])
        w.writerow([i, name, support, correct, f"{correct / support:.6f}" if support else ""])
    return buf.getvalue()


def confusion_csv(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["actual", "predicted"])
    for a, p in zip(labels.tolist(), pred.tolist()):
        w.writerow([classes[a], classes[p]])
    return buf.getvalue()


def training_dataset(run: Run) -> tuple[str, str] | None:
    """(name, digest) of the dataset the run trained on (its input with context `training`)."""
    for entry in run.inputs.dataset_inputs if run.inputs else []:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in entry.tags):
            return entry.dataset.name, entry.dataset.digest
    return None


def logged_model_of(run: Run) -> str | None:
    """The LoggedModel the run logged last (`tasn train` logs one), if any."""
    outputs = run.outputs.model_outputs if run.outputs else []
    return outputs[-1].model_id if outputs else None


def log_to_run(run_id: str, metrics: dict[str, float], out_dir: Path, tags: dict[str, str],
               model_id: str | None = None) -> None:
    """The metrics as `test_<key>` on the run, against `model_id` (default: the run's own logged
    model) and the run's training dataset; the files under `evaluate/`; the tags."""
    mc = MlflowClient()
    run = mc.get_run(run_id)
    model_id = model_id or logged_model_of(run)
    name, digest = training_dataset(run) or (None, None)
    now = int(time.time() * 1000)
    mc.log_batch(run_id, metrics=[Metric(f"test_{k}", float(v), now, 0, model_id=model_id, dataset_name=name,
                                         dataset_digest=digest) for k, v in metrics.items()],
                 tags=[RunTag(k, v) for k, v in tags.items()])
    mc.log_artifacts(run_id, str(out_dir), RUN_ARTIFACTS)


def check_run(run_id: str) -> None:
    """Fail before any work when the run to log to is not there."""
    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise ServiceError(f"MLflow run {run_id} not found ({exc.message}); check --run-id / --run-json") from exc


def evaluate(cfg: Config, data_dir: str | os.PathLike[str], model: str, out_dir: str | os.PathLike[str],
             run_id: str | None = None, run_json: str | os.PathLike[str] | None = None) -> EvaluateResult:
    """Evaluate `model` (a model.pt path or URI, or an MLflow model URI) on the test split of
    `data_dir`; write the outputs to `out_dir` (replaced whole, atomically; held against a second
    run meanwhile) and log them to `run_id`, else the run of `run_json` (train's run.json, whose
    model must be `model`: `tasn.io.check_same_model`), else the run that logged an MLflow model."""
    check(cfg)
    check_apart(data_dir, out_dir, DataError, "--out")  # the output replaces its folder whole
    if not (tracking.is_mlflow_uri(model) or storage.is_s3(model)):
        check_apart(model, out_dir, DataError, "--out")
    recorded = None
    if run_json is not None:
        recorded = read_json(run_json, "--run-json")
        run_id = run_id or tracking.RunInfo.read(run_json, "--run-json").run_id
    with output_lock(out_dir):
        if recorded is not None and "://" not in model and Path(model).is_file():  # before any server is asked
            check_same_model((file_sha256(model), f"--model {model}"),
                             (recorded.get(MODEL_SHA256), f"--run-json {run_json}"), DataError)
        return _evaluate(cfg, data_dir, model, Path(out_dir), run_id, recorded)


def _evaluate(cfg: Config, data_dir: str | os.PathLike[str], model: str, out: Path, run_id: str | None,
              recorded: dict[str, Any] | None) -> EvaluateResult:
    e = cfg.evaluate
    if run_id or tracking.is_mlflow_uri(model):
        tracking.setup(cfg.tracking)
    loaded = load(model, cfg)
    if recorded is not None:  # an MLflow or s3:// model: its digest is known once it is read
        check_same_model((loaded.sha256, f"--model {model}"), (recorded.get(MODEL_SHA256), "--run-json"), DataError)
    predictor = loaded.predictor
    run_id = run_id or loaded.run_id
    if run_id:
        check_run(run_id)
    ds = load_test_split(data_dir, predictor)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor.to(device).eval()
    net = predictor.model
    heads, labels = collect_logits(net, ds, e.batch_size, e.workers, device)
    primary = net.primary_head
    metrics = compute_metrics(heads, labels, primary, e.topk, loaded.temperature)
    metrics.update(time_forward(predictor, e.batch_size, e.timing_batches, device))
    pred = heads[primary].argmax(dim=1)
    classes = list(ds.classes)
    conf = confusion_matrix(pred, labels, len(classes))
    title = f"{type(net).__name__} ({primary})\ntop-1 {metrics['top1']:.1%} on {len(labels)} test images"
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / METRICS, metrics)
        atomic_write_json(tmp / EVALUATED, {"model": redact_text(model), MODEL_SHA256: loaded.sha256, "run_id": run_id})
        atomic_write_text(tmp / PER_CLASS, per_class_csv(conf, classes))
        atomic_write_text(tmp / CONFUSION_CSV, confusion_csv(pred, labels, classes))
        viz.save_figure(viz.confusion_figure(conf, classes, title), tmp / CONFUSION_PNG)
    if run_id:
        tags = {"evaluate.model": model, "evaluate.device": str(device), "evaluate.primary_head": primary}
        log_to_run(run_id, metrics, out, tags, loaded.model_id)
        log.info("logged %d test metrics and the evaluation files to run %s", len(metrics), run_id)
    log.info("%s: top-1 %.4f (%s), top-5 %.4f on %d images", model, metrics["top1"], primary, metrics["top5"],
             len(labels))
    return EvaluateResult(out, metrics, run_id)
