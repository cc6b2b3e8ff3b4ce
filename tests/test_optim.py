"""Optimizer, schedule and budget (tasn.training.optim): the authors' step decay, the demo's warm-up + cosine,
the minimum step budget."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tasn.config import TrainConfig
from tasn.training.optim import LRFactor, build_optimizer, build_scheduler, plan_budget


def _lrs(t: TrainConfig, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model.parameters(), t)
    sched = build_scheduler(opt, t, steps_per_epoch)
    lrs = []
    for _ in range(t.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_schedule_per_update_gives_the_learning_rates_of_an_epoch_wise_multistep():
    t = TrainConfig(epochs=5, lr=0.1, schedule="step", milestones=[2, 4], gamma=0.1, warmup_epochs=0.0)  # authors' kind
    got = _lrs(t, steps_per_epoch=3)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    want = []
    for _ in range(5):
        want += [opt.param_groups[0]["lr"]] * 3
        opt.step()
        ref.step()
    assert got == pytest.approx(want)


def test_warmup_then_cosine_by_hand():
    t = TrainConfig(epochs=4, lr=2e-3, optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup_epochs=1.0)
    got = _lrs(t, steps_per_epoch=5)
    want = [2e-3 * (k + 1) / 5 for k in range(5)]  # linear warm-up over the first epoch's 5 steps
    want += [2e-3 * 0.5 * (1 + math.cos(math.pi * (k - 5) / 15)) for k in range(5, 20)]
    assert got == pytest.approx(want)
    assert got[5] == pytest.approx(2e-3) and got[-1] < 0.02 * 2e-3


def test_factor_edges_and_optimizers():
    assert LRFactor("cosine", epochs=2, steps_per_epoch=4)(0) == 1.0  # no warm-up: starts at lr
    assert LRFactor("step", epochs=3, steps_per_epoch=2, warmup_epochs=0.5, milestones=[1])(0) == 1.0  # 1 warm-up step
    with pytest.raises(ValueError, match="train.schedule: 'poly' is not one of step, cosine"):
        LRFactor("poly", epochs=1, steps_per_epoch=1)
    model = torch.nn.Linear(2, 2)
    sgd = build_optimizer(model.parameters(), TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.0 and sgd.defaults["weight_decay"] == 0.0
    adamw = build_optimizer(model.parameters(), TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05


def test_the_budget_raises_epochs_to_the_minimum_steps_and_stretches_milestones():
    t = TrainConfig(epochs=8, min_steps=600, schedule="step", milestones=[4, 6])
    assert plan_budget(t, steps_per_epoch=75) == t  # 600 steps already: as configured
    small = plan_budget(t, steps_per_epoch=28)  # 224 steps: 22 epochs of 28 = 616
    assert (small.epochs, small.milestones) == (22, [11, 16])
    assert small.epochs * 28 >= 600 > (small.epochs - 1) * 28
    assert plan_budget(dataclasses.replace(t, min_steps=0), 28) == dataclasses.replace(t, min_steps=0)
    assert plan_budget(dataclasses.replace(t, epochs=0), 28).epochs == 0  # no training asked for: none

