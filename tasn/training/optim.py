"""The optimizer and the learning-rate schedule, built from `train.*`.

The authors' recipe, as the `cub` profile runs it: SGD (lr 0.1, no momentum or weight decay) and a
step schedule (x `gamma` at each epoch of `milestones`); the demo uses the same with momentum. The
schedule steps once per whole epoch (`Loop.end_epoch`), so a resumed run keeps its place in it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tasn.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
