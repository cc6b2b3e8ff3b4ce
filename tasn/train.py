"""The training stage: one process on a laptop CPU, or many under `torchrun` on many GPUs.

Plain on purpose, in the shape of torchvision's references/classification: build data, model,
loss, optimizer and schedule; maybe resume; loop over epochs (train, evaluate, checkpoint, log);
write the outputs. What makes it hold up at scale:

- **Sharding** by `ResumableSampler` (a DistributedSampler that can start mid-epoch), losses and
  metrics averaged over ranks, rank 0 alone logging, drawing the progress bar and writing files.
- **Reproducibility**: augmentation is seeded per (seed, epoch, sample index), so an image is
  augmented identically whichever rank or worker loads it and whether or not the run was
  interrupted; loaders take their own generator, so they never draw from the global RNG.
- **Checkpoints** (tasn.checkpoint) every `checkpoint_every` optimizer steps and at each epoch end,
  holding the sampler position: a run killed mid-epoch and resumed sees the same batches, in the
  same order, with the same random state, and ends with the same weights.
- **Precision**: bf16 autocast (fp16 + GradScaler on GPUs without bf16) and channels-last on CUDA
  only; CPU runs stay fp32.
- **Tracking** (tasn.tracking): checked before any work, retried during it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from tasn import checkpoint, distributed, storage
from tasn.errors import DataError, TASNError
from tasn.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

BATCHNORM_MODES = ("local", "sync", "frozen")


# -- data ------------------------------------------------------------------------------------

def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under a fixed torch (CPU) and python seed, then restore both generators."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


class EpochSeeded(Dataset):
    """Augmentation as a function of (seed, epoch, index): the same sample gets the same random
    crop/flip/jitter no matter which rank, worker or resumed process loads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first `consumed` samples (global count) of an epoch.

    The epoch's global order is the seeded permutation; what is left after `consumed` is dealt
    round-robin to the ranks. With consumed = 0 this is exactly DistributedSampler's sharding, and
    one process with batch 2b reads, step by step, the union of what two processes with batch b
    read, which is what makes 1-process and N-process runs comparable.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.set_epoch(epoch)
        self.consumed = consumed

    def _remaining(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        rest = order[self.consumed:]
        pad = (-len(rest)) % self.num_replicas
        return rest + (order * math.ceil(pad / max(n, 1)))[:pad]

    def __iter__(self):
        return iter(self._remaining()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(max(len(self.dataset) - self.consumed, 0) / self.num_replicas)


def _seed_worker(worker_id: int) -> None:
    """numpy and python in a loader worker follow torch's per-worker seed (itself from the
    loader's own generator), so workers are reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def load_datasets(cfg, data_dir: Path):
    """(train set with augmentation, test set with the eval crop, class names)."""
    from tasn.data.dataset import PreparedDataset
    from tasn.data.transforms import eval_transform, train_transform

    t, m = cfg.train, cfg.model
    train_set = PreparedDataset(data_dir, "train", train_transform(m.input_size, t.jitter, t.rotation))
    test_set = PreparedDataset(data_dir, "test", eval_transform(m.input_size))
    if len(train_set) == 0 or len(test_set) == 0:
        raise DataError(f"{data_dir}: the train and test splits must both be non-empty "
                        f"(train {len(train_set)}, test {len(test_set)} images)")
    return train_set, test_set, list(train_set.classes)


def make_loader(dataset, batch_size: int, sampler, workers: int, device: torch.device, seed: int,
                drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


# -- model, precision, determinism -----------------------------------------------------------

def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def precision(amp: bool, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing); fp32 elsewhere."""
    if not (amp and device.type == "cuda"):
        return None, torch.amp.GradScaler("cpu", enabled=False)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)
    return torch.float16, torch.amp.GradScaler("cuda", enabled=True)


def set_train_mode(model: nn.Module, batchnorm: str) -> None:
    """model.train(), except that `frozen` keeps BatchNorm on its running statistics."""
    model.train()
    if batchnorm == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- the loop --------------------------------------------------------------------------------

@dataclass
class Position:
    """Where the run is: `epoch` (0-based, current), optimizer `step` (global), and `batch`,
    the number of micro-batches of the current epoch already trained on (per rank)."""

    epoch: int = 0
    step: int = 0
    batch: int = 0


@dataclass
class Loop:
    cfg: object
    ctx: distributed.Context
    model: nn.Module  # DDP-wrapped when distributed
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    classes: list
    ckpt_dir: str
    run: object = None  # tasn.tracking.Run on rank 0 when tracking
    run_id: str | None = None

    def __post_init__(self):
        self.pos = Position()
        self.history: list[dict] = []  # one row per epoch
        self.steps: list[dict] = []  # one row per logged optimizer step
        self.endpoint = self.cfg.tracking.s3_endpoint or None

    # inputs on the device, channels-last on CUDA
    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.device.type == "cuda" and self.cfg.train.channels_last:
            return x.to(self.ctx.device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(self.ctx.device, non_blocking=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype)

    # checkpoints
    def state(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "epoch": self.pos.epoch,
            "step": self.pos.step,
            "batch": self.pos.batch,
            "world_size": self.ctx.world_size,
            "history": self.history,
            "steps": self.steps,
            "run_id": self.run_id or "",
            "config": self.cfg.to_dict(),
            "classes": self.classes,
            "kind": self.cfg.model.kind,
        }

    def restore(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.pos = Position(state["epoch"], state["step"], state["batch"])
        if state["batch"] and state.get("world_size") != self.ctx.world_size:
            # the sampler position is a global sample count, so it carries over exactly
            log.info("resuming mid-epoch with %d processes instead of %d", self.ctx.world_size, state["world_size"])
        self.history, self.steps = list(state["history"]), list(state["steps"])
        self.run_id = state.get("run_id") or None

    def save(self) -> None:
        if self.ctx.is_main:
            uri = checkpoint.save_checkpoint(self.state(), self.ckpt_dir, self.pos.step,
                                             keep=self.cfg.train.keep_checkpoints, endpoint=self.endpoint)
            log.info("checkpoint %s (epoch %d, batch %d)", uri, self.pos.epoch + 1, self.pos.batch)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self, loader: DataLoader, total_batches: int) -> tuple[float, bool]:
        """One (possibly resumed) epoch. Returns (mean training loss over ranks, stopped early)."""
        from tqdm import tqdm

        t = self.cfg.train
        set_train_mode(self.model, t.batchnorm)
        accum, world = t.accum_steps, self.ctx.world_size
        sums: dict[str, torch.Tensor] = {}
        count, epoch_loss, epoch_count = 0, torch.zeros((), dtype=torch.float64, device=self.ctx.device), 0
        tick, images = time.perf_counter(), 0
        bar = tqdm(loader, total=total_batches, initial=self.pos.batch, desc=f"epoch {self.pos.epoch + 1}/{t.epochs}",
                   disable=not self.ctx.is_main, file=sys.stderr, leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = self.to_device(x), y.to(self.ctx.device, non_blocking=True)
            self.pos.batch += 1
            boundary = self.pos.batch % accum == 0 or self.pos.batch == total_batches
            sync = boundary or not self.ctx.distributed
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
                out = self.model(x)
                loss, terms = self.loss_fn(out, y)
            self.scaler.scale(loss / accum).backward()
            for k, v in {"loss": loss, **{f"loss_{name}": term for name, term in terms.items()}}.items():
                sums[k] = sums.get(k, 0) + v.detach().double()
            count += 1
            images += x.shape[0] * world
            epoch_loss += loss.detach().double()
            epoch_count += 1
            if not boundary:
                continue
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.pos.step += 1
            if self.pos.step % t.log_every == 0 or self.pos.batch == total_batches:
                means = distributed.mean_over_ranks({k: float(v) / count for k, v in sums.items()}, self.ctx.device)
                elapsed = time.perf_counter() - tick
                row = {"step": self.pos.step, "epoch": self.pos.epoch + 1, "lr": self.lr(),
                       "images_per_s": images / elapsed if elapsed > 0 else 0.0, **means}
                self.steps.append(row)
                bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{row['lr']:.3g}")
                if self.run is not None:
                    self.run.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=self.pos.step)
                sums, count, tick, images = {}, 0, time.perf_counter(), 0
            stop = bool(t.max_steps) and self.pos.step >= t.max_steps
            if (t.checkpoint_every and self.pos.step % t.checkpoint_every == 0 and self.pos.batch < total_batches
                    and not stop):
                self.save()
            if stop:
                break
        bar.close()
        mean = distributed.mean_over_ranks({"loss": float(epoch_loss) / max(epoch_count, 1)}, self.ctx.device)
        return mean["loss"], bool(t.max_steps) and self.pos.step >= t.max_steps

    @torch.inference_mode()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Top-1 of every head and the mean loss on this rank's shard, summed over ranks."""
        model = unwrap(self.model)
        model.eval()
        heads = list(model.heads)
        totals = torch.zeros(len(heads) + 2, dtype=torch.float64, device=self.ctx.device)
        for x, y in loader:
            x, y = self.to_device(x), y.to(self.ctx.device, non_blocking=True)
            with self.autocast():
                out = model(x)
                loss, _ = self.loss_fn(out, y)
            for i, head in enumerate(heads):
                totals[i] += (getattr(out, head).argmax(dim=1) == y).sum()
            totals[-2] += loss.double() * y.numel()
            totals[-1] += y.numel()
        distributed.all_reduce_sum(totals)
        n = max(float(totals[-1]), 1.0)
        metrics = {f"{head}_top1": float(totals[i]) / n for i, head in enumerate(heads)}
        metrics["val_loss"] = float(totals[-2]) / n
        return metrics


def _picture_batch(test_set, count: int):
    """A fixed, evenly spread set of validation images (the same every epoch)."""
    if count <= 0:
        return None
    idx = sorted({int(i) for i in np.linspace(0, len(test_set) - 1, min(count, len(test_set))).round()})
    items = [test_set[i] for i in idx]
    return torch.stack([x for x, _ in items]), [int(y) for _, y in items]


def draw_attention(loop: Loop, batch, out_dir: Path) -> None:
    """Attention maps and sampled images for the fixed validation images (TASN only)."""
    from tasn import viz

    model = unwrap(loop.model)
    if batch is None or not hasattr(model, "attention_maps"):
        return
    images, labels = batch
    model.eval()
    with torch.inference_mode():
        _, extras = model(loop.to_device(images), return_extras=True)
    titles = [loop.classes[y] for y in labels]
    name = f"attention_epoch_{loop.pos.epoch + 1:03d}.png"
    fig = viz.attention_figure(images, extras, titles, columns_title=f"epoch {loop.pos.epoch + 1}")
    if loop.run is not None:
        loop.run.log_figure(fig, f"attention/{name}")
    viz.save_figure(fig, out_dir / "pictures" / name)


def _csv(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _resume_source(resume: str, ckpt_dir: str, endpoint: str | None) -> str | None:
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoint.latest_checkpoint(ckpt_dir, endpoint)
    if not storage.exists(resume, endpoint):
        raise TASNError(f"--resume {resume}: no checkpoint there")
    return resume


def _start_run(cfg, data_dir: Path, ctx: distributed.Context, run_id: str | None):
    from tasn import tracking

    tags = {
        "git.commit": tracking.git_commit(),
        "data.version": tracking.data_version() or "untracked",
        "data.path": str(data_dir),
        "model.kind": cfg.model.kind,
        "world_size": str(ctx.world_size),
        "device": str(ctx.device.type),
    }
    run = tracking.Run(cfg.tracking, tags, run_id=run_id, run_name=f"{cfg.model.kind}-{cfg.model.backbone}")
    run.log_params({**cfg.flat(), "data.dir": str(data_dir), "world_size": ctx.world_size})
    return run


def _finish(loop: Loop, cfg, out_dir: Path, metrics: dict, train_loss: float, epochs_done: int) -> dict:
    """Rank 0: model.pt, metrics.json, history.csv, steps.csv, learning curves, the MLflow model
    and run.json, each written atomically."""
    from tasn import viz
    from tasn.predict import Predictor, log_model

    model = unwrap(loop.model)
    checkpoint.save_model(str(out_dir / "model.pt"), model, cfg.to_dict(), loop.classes,
                          epochs=epochs_done, steps=loop.pos.step)
    primary = model.primary_head
    summary = {**metrics, "train_loss": train_loss, "epochs": epochs_done, "steps": loop.pos.step,
               "primary_head": primary, "top1": metrics.get(f"{primary}_top1"), "kind": cfg.model.kind}
    atomic_write_json(out_dir / "metrics.json", summary)
    atomic_write_text(out_dir / "history.csv", _csv(loop.history))
    atomic_write_text(out_dir / "steps.csv", _csv(loop.steps))
    if loop.history:
        viz.save_figure(viz.learning_curves(loop.history, primary), out_dir / "learning_curves.png")
    run_info = {"run_id": None, "experiment_id": None, "tracking_uri": None, "model_uri": None}
    if loop.run is not None:
        for name in ("metrics.json", "history.csv", "learning_curves.png"):
            if (out_dir / name).exists():
                loop.run.log_artifact(out_dir / name)
        predictor = Predictor(model.cpu(), loop.classes, cfg.model.input_size, cfg.preprocess.size)
        info = loop.run.log_model(lambda: log_model(predictor))
        run_info = {"run_id": loop.run.run_id, "experiment_id": loop.run.experiment_id,
                    "tracking_uri": loop.run.uri, "model_uri": info.model_uri if info else None}
    atomic_write_json(out_dir / "run.json", run_info)
    return {**summary, **run_info, "out": str(out_dir)}


def train(cfg, data_dir, out_dir, resume: str | None = None) -> dict:
    """Train `cfg.model` on the prepared data at `data_dir`; write the outputs to `out_dir`.

    `resume`: None = `cfg.train.resume`; "auto" = the newest checkpoint in the checkpoint dir
    (what an elastic torchrun restart wants); "never"; or a checkpoint path / s3:// URI.
    Returns the summary (final metrics, run ids) on every rank; only rank 0 writes files.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    t = cfg.train
    if t.batchnorm not in BATCHNORM_MODES:
        raise TASNError(f"train.batchnorm: {t.batchnorm!r} is not one of {', '.join(BATCHNORM_MODES)}")
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such directory (run `tasn preprocess` first)")
    ctx = distributed.init()
    if not ctx.is_main:
        logging.getLogger("tasn").setLevel(logging.WARNING)
    try:
        if ctx.is_main and cfg.tracking.enabled:
            from tasn import tracking

            tracking.setup(cfg.tracking)  # fail fast, before any data or model work
        return _train(cfg, data_dir, out_dir, resume or t.resume, ctx)
    finally:
        distributed.cleanup()


def _train(cfg, data_dir: Path, out_dir: Path, resume: str, ctx: distributed.Context) -> dict:
    from tasn.model import build_loss, build_model

    t = cfg.train
    configure_determinism(t.deterministic)
    seed_everything(t.seed)
    train_set, test_set, classes = load_datasets(cfg, data_dir)
    model = build_model(cfg.model, len(classes))  # identical on every rank: same seed
    if t.batchnorm == "sync":
        if ctx.device.type != "cuda":
            raise TASNError("train.batchnorm: sync needs CUDA; use local or frozen on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    if ctx.device.type == "cuda" and t.channels_last:
        model.to(memory_format=torch.channels_last)
    seed_everything(t.seed + 1000 * ctx.rank)  # ranks draw independent random numbers from here
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=t.milestones, gamma=t.gamma)
    amp_dtype, scaler = precision(t.amp, ctx.device)
    ckpt_dir = t.checkpoint_dir or str(out_dir / "checkpoints")
    loop = Loop(cfg, ctx, model, build_loss(cfg.model, cfg.loss).to(ctx.device), optimizer, scheduler,
                scaler, amp_dtype, classes, ckpt_dir)
    source = distributed.broadcast_object(_resume_source(resume, ckpt_dir, loop.endpoint) if ctx.is_main else None)
    if source:
        loop.restore(checkpoint.load_checkpoint(source, loop.endpoint))
        log.info("resuming from %s at epoch %d, batch %d, step %d", source, loop.pos.epoch + 1, loop.pos.batch, loop.pos.step)
    if ctx.distributed:
        loop.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if ctx.is_main and cfg.tracking.enabled:
        loop.run = _start_run(cfg, data_dir, ctx, loop.run_id)
        loop.run_id = loop.run.run_id

    augmented = EpochSeeded(train_set, t.seed)
    sampler = ResumableSampler(augmented, ctx.world_size, ctx.rank, shuffle=True, seed=t.seed)
    test_shard = Subset(test_set, range(ctx.rank, len(test_set), ctx.world_size))
    test_loader = make_loader(test_shard, cfg.evaluate.batch_size, None, t.workers, ctx.device, t.seed, drop_last=False)
    batches_per_epoch = len(train_set) // ctx.world_size // t.batch_size
    if batches_per_epoch == 0:
        raise DataError(f"{data_dir}: {len(train_set)} training images are fewer than one batch of "
                        f"{t.batch_size} per process x {ctx.world_size} processes")
    pictures = _picture_batch(test_set, t.picture_images) if ctx.is_main else None
    metrics, train_loss, status = {}, float("nan"), "FAILED"
    try:
        stopped = bool(t.max_steps) and loop.pos.step >= t.max_steps
        while loop.pos.epoch < t.epochs and not stopped:
            consumed = loop.pos.batch * t.batch_size * ctx.world_size
            augmented.epoch = loop.pos.epoch
            sampler.set_position(loop.pos.epoch, consumed)
            loader = make_loader(augmented, t.batch_size, sampler, t.workers, ctx.device,
                                 t.seed + loop.pos.epoch, drop_last=True)
            train_loss, stopped = loop.train_epoch(loader, batches_per_epoch)
            metrics = loop.evaluate(test_loader)
            loop.history.append({"epoch": loop.pos.epoch + 1, "step": loop.pos.step, "lr": loop.lr(),
                                 "train_loss": train_loss, **metrics})
            primary = unwrap(loop.model).primary_head
            log.info("epoch %d: train loss %.4f, val loss %.4f, %s top-1 %.3f", loop.pos.epoch + 1, train_loss,
                     metrics["val_loss"], primary, metrics[f"{primary}_top1"])
            if loop.run is not None:
                loop.run.log_metrics({**metrics, "top1": metrics[f"{primary}_top1"], "train_loss": train_loss,
                                      "epoch": loop.pos.epoch + 1}, step=loop.pos.step)
            if ctx.is_main:
                draw_attention(loop, pictures, out_dir)
            if loop.pos.batch >= batches_per_epoch:  # a whole epoch: next one
                loop.scheduler.step()
                loop.pos = Position(loop.pos.epoch + 1, loop.pos.step, 0)
            loop.save()
        if not metrics:  # resumed a finished run: nothing trained, evaluate what there is
            metrics = loop.evaluate(test_loader)
            train_loss = loop.history[-1]["train_loss"] if loop.history else float("nan")
        summary = {}
        if ctx.is_main:
            summary = _finish(loop, cfg, out_dir, metrics, train_loss, len(loop.history))
        status = "FINISHED"
        distributed.barrier()
        return distributed.broadcast_object(summary)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if loop.run is not None:
            loop.run.end(status)
