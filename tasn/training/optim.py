"""The optimizer and the learning-rate schedule, built from `train.*`.

Two recipes are built from here. The authors' (the `cub` profiles): plain SGD, lr 0.1, no
momentum, no weight decay, x0.1 at epochs 100 and 200, from ImageNet weights. And the from-scratch
recipe of the CPU demo (docs/training.md says how it was chosen): SGD with momentum 0.9 and weight
decay, a linear warm-up, a cosine decay.

The schedule is a function of the optimizer step, not of the epoch, and the scheduler is stepped
after every optimizer step (`Loop`): a warm-up of one epoch on a small set is a handful of steps,
and an epoch-wise schedule would spend all of them at one learning rate. Step decay at epoch
milestones gives the same learning rates as an epoch-wise MultiStepLR (the decay lands on the first
step of the milestone epoch), and is what the authors' MXNet MultiFactorScheduler does (per
update). The scheduler's state (its step count) is in every checkpoint, so a resumed run, even one
resumed mid-epoch, keeps its place in the schedule.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch

from tasn.choices import OPTIMIZERS, SCHEDULES
from tasn.config import TrainConfig


def plan_budget(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """`cfg` with `epochs` raised, when its epochs are fewer than `min_steps` optimizer steps, to the
    fewest whole epochs that reach it; step milestones are stretched by the same factor, so the
    schedule keeps its shape. A small set gets more passes, a large one is trained as configured."""
    if not cfg.epochs or cfg.epochs * steps_per_epoch >= cfg.min_steps:
        return cfg
    epochs = math.ceil(cfg.min_steps / max(1, steps_per_epoch))
    milestones = [round(m * epochs / cfg.epochs) for m in cfg.milestones]
    return dataclasses.replace(cfg, epochs=epochs, milestones=milestones)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """`train.optimizer`: sgd (lr, momentum, weight_decay) or adamw (lr, weight_decay)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer: {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


class LRFactor:
    """Multiplier of the base learning rate for optimizer step k (0-based).

    Warm-up: (k + 1) / W for the first W = warmup_epochs x steps_per_epoch steps. Then `step`:
    gamma ** (milestones passed), a milestone being passed from the first step of that epoch on;
    or `cosine`: from 1 down to 0 over the remaining steps of `epochs`.
    """

    def __init__(self, schedule: str, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                 milestones: Sequence[int] = (), gamma: float = 0.1):
        if schedule not in SCHEDULES:
            raise ValueError(f"train.schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
        self.schedule, self.gamma = schedule, gamma
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = max(1, epochs * self.steps_per_epoch)
        self.warmup = min(round(warmup_epochs * self.steps_per_epoch), self.total)
        self.milestones = sorted(m * self.steps_per_epoch for m in milestones)

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        if self.schedule == "step":
            return float(self.gamma ** bisect.bisect_right(self.milestones, k))
        progress = (k - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over optimizer steps (`steps_per_epoch` of them per epoch)."""
    factor = LRFactor(cfg.schedule, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.milestones, cfg.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

