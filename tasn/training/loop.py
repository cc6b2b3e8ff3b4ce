"""The training loop: one epoch of optimizer steps, the end-of-epoch step, and the run's state.

`Loop` holds what changes while training (the model, optimizer, schedule, grad scaler, position,
history) and nothing else; the data comes in as loaders. Its `state()` is the whole checkpoint, so
a run killed at any step and resumed ends with the weights of one that never stopped.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from tasn import checkpoint, distributed, viz
from tasn.config import Config
from tasn.model.losses import TASNLoss
from tasn.model.network import Network
from tasn.tracking import Run
from tasn.training.meter import MetricLogger
from tasn.training.modes import autocast, precision, set_train_mode, unwrap, uses_channels_last
from tasn.training.outputs import ATTENTION_ARTIFACTS, PICTURES, picture_name
from tasn.training.progress import EpochProgress

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where the run is: `epoch` (0-based, current), optimizer `step` (global), and `batch`,
    the number of micro-batches of the current epoch already trained on (per rank)."""

    epoch: int = 0
    step: int = 0
    batch: int = 0


@dataclass
class Loop:
    cfg: Config
    ctx: distributed.Context
    model: nn.Module  # DDP-wrapped when distributed (`unwrap` gives the network)
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    classes: list[str]
    ckpt_dir: str
    run: Run | None = None  # the MLflow run, on rank 0 when tracking
    run_id: str | None = None  # the run to continue (from a checkpoint), then the run's own
    pos: Position = field(default_factory=Position)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    steps: list[dict[str, Any]] = field(default_factory=list)  # one row per logged optimizer step
    fingerprint: dict[str, Any] = field(default_factory=dict)  # tasn.checkpoint.fingerprint of this run
    budget: int = 0  # optimizer steps of the whole run

    def __post_init__(self) -> None:
        self.amp_dtype, self.scaler = precision(self.cfg.train.amp, self.ctx.device)
        self.endpoint = self.cfg.tracking.s3_endpoint or None

    @property
    def net(self) -> Network:
        return unwrap(self.model)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs on the device, channels-last on CUDA."""
        if uses_channels_last(self.cfg.train, self.ctx.device):
            return x.to(self.ctx.device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(self.ctx.device, non_blocking=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def done(self) -> bool:
        t = self.cfg.train
        return self.pos.epoch >= t.epochs or self.stopped()

    def stopped(self) -> bool:
        """`train.max_steps` reached (smoke runs)."""
        return bool(self.cfg.train.max_steps) and self.pos.step >= self.cfg.train.max_steps

    # -- checkpoints -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
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
            "fingerprint": self.fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
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

    # -- one epoch -------------------------------------------------------------------------------

    def train_epoch(self, loader: DataLoader, total_batches: int) -> float:
        """One (possibly resumed) epoch; returns the mean training loss over its batches and ranks."""
        t = self.cfg.train
        set_train_mode(self.model, t.batchnorm)
        window, epoch = MetricLogger(self.ctx.device), MetricLogger(self.ctx.device)
        bar = EpochProgress(total_batches, self.pos.batch, f"epoch {self.pos.epoch + 1}/{t.epochs}",
                            enabled=self.ctx.is_main)
        for x, y in loader:
            self._gate_branches()
            self.pos.batch += 1
            boundary = self.pos.batch % t.accum_steps == 0 or self.pos.batch == total_batches
            loss, terms = self._forward_backward(self.to_device(x), y.to(self.ctx.device, non_blocking=True),
                                                 sync=boundary or not self.ctx.distributed)
            images = x.shape[0] * self.ctx.world_size
            window.update(images, loss=loss, **{f"loss_{name}": term for name, term in terms.items()})
            epoch.update(images, loss=loss)
            if boundary:
                self._optimizer_step()
                if self.pos.step % t.log_every == 0 or self.pos.batch == total_batches:
                    self._log_step(window, bar)
                    window.reset()
            bar.update()  # after the step's numbers, so a progress line shows the latest
            if not boundary:
                continue
            if self.stopped():
                break
            if t.checkpoint_every and self.pos.step % t.checkpoint_every == 0 and self.pos.batch < total_batches:
                self.save()
        bar.close()
        return epoch.means()["loss"]

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward and loss under autocast, backward of the loss share of one micro-batch; the
        gradient all-reduce of DDP runs only when `sync` (the last micro-batch of a step)."""
        model = self.model
        grad_sync: AbstractContextManager[object] = contextlib.nullcontext()
        if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
            grad_sync = model.no_sync()
        with grad_sync, autocast(self.amp_dtype, self.ctx.device):
            loss, terms = self.loss_fn(model(x), y)
        self.scaler.scale(loss / self.cfg.train.accum_steps).backward()
        return loss, terms

    def _gate_branches(self) -> None:
        """TASN's sampling branches wait for `train.attention_first` of the budget: from random
        weights the maps point nowhere, and a backbone trained on those zooms memorises the
        training set instead of learning the details the maps later show it (issue 24)."""
        if isinstance(self.loss_fn, TASNLoss):
            self.loss_fn.branches = 0.0 if self.pos.step < self.attention_first_steps() else 1.0

    def attention_first_steps(self) -> int:
        return round(self.cfg.train.attention_first * self.budget)

    def _optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule is per optimizer step (tasn.training.optim)
        self.pos.step += 1

    def _log_step(self, window: MetricLogger, bar: EpochProgress) -> None:
        means = window.means()
        row = {"step": self.pos.step, "epoch": self.pos.epoch + 1, "lr": self.lr(),
               "images_per_s": window.images_per_s(), **means, "nonfinite_attention": self._nonfinite_attention()}
        self.steps.append(row)
        bar.show(loss=f"{means['loss']:.3f}", lr=f"{row['lr']:.3g}")
        if self.run is not None:
            self.run.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=self.pos.step)

    def _nonfinite_attention(self) -> int:
        """Training images since the last log step (all ranks) whose attention maps held NaN or Inf,
        so the sampler resized them plainly; a warning when any did: a diverged attention net would
        otherwise train on, silently, as the baseline."""
        take = getattr(self.net, "take_nonfinite_attention", None)  # TASN; the baseline has no attention
        count = torch.tensor(float(take() if take else 0), dtype=torch.float64, device=self.ctx.device)
        n = int(distributed.all_reduce_sum(count))
        if n and self.ctx.is_main:
            log.warning("step %d: %d training image(s) since the last log had NaN or Inf attention maps and were "
                        "resized plainly by the sampler (a diverging attention net? try a lower train.lr)",
                        self.pos.step, n)
        return n

    @torch.inference_mode()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Top-1 of every head and the mean loss on this rank's shard, summed over ranks. In float32
        whatever `train.amp` says: the precision of `tasn evaluate` and of the deployed model, so a
        checkpoint has one accuracy."""
        net = self.net
        net.eval()
        heads = net.heads
        totals = torch.zeros(len(heads) + 2, dtype=torch.float64, device=self.ctx.device)
        for x, y in loader:
            x, y = self.to_device(x), y.to(self.ctx.device, non_blocking=True)
            out = net(x)
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

    # -- the end of an epoch ---------------------------------------------------------------------

    def end_epoch(self, train_loss: float, test_loader: DataLoader, epoch_batches: int,
                  pictures: tuple[torch.Tensor, list[int]] | None, out_dir: Path) -> dict[str, float]:
        """After an epoch (or the part of one before `max_steps`): evaluate, record and log the
        numbers, draw the attention pictures, move to the next epoch if this one is whole, checkpoint.
        Returns the test metrics."""
        metrics = self.evaluate(test_loader)
        epoch = self.pos.epoch + 1
        self.history.append({"epoch": epoch, "step": self.pos.step, "lr": self.lr(), "train_loss": train_loss,
                             **metrics})
        primary = self.net.primary_head
        log.info("epoch %d: train loss %.4f, val loss %.4f, %s top-1 %.3f", epoch, train_loss,
                 metrics["val_loss"], primary, metrics[f"{primary}_top1"])
        if self.run is not None:  # against the step, as every metric of the run: the epoch is no metric
            self.run.log_metrics({**metrics, "top1": metrics[f"{primary}_top1"], "train_loss": train_loss},
                                 step=self.pos.step)
        if self.ctx.is_main:
            self.draw(pictures, out_dir)
        if self.pos.batch >= epoch_batches:  # a whole epoch: the next one starts
            self.pos = Position(self.pos.epoch + 1, self.pos.step, 0)
        self.save()
        return metrics

    def draw(self, pictures: tuple[torch.Tensor, list[int]] | None, out_dir: Path) -> None:
        """Attention maps and sampled images of the fixed test images (TASN only), saved under
        pictures/ and logged to the run."""
        net = self.net
        if pictures is None or not hasattr(net, "attention_maps"):
            return
        images, labels = pictures
        net.eval()
        with torch.inference_mode():
            _, extras = net(self.to_device(images), return_extras=True)
        epoch = self.pos.epoch + 1
        fig = viz.attention_figure(images, extras, [self.classes[y] for y in labels], columns_title=f"epoch {epoch}")
        name = picture_name(epoch)
        if self.run is not None:
            self.run.log_figure(fig, f"{ATTENTION_ARTIFACTS}/{name}")
        viz.save_figure(fig, out_dir / PICTURES / name)
