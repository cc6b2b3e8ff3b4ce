"""`tasn train` says when a run learned nothing (training loss still at its chance value) and what to try."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from tasn.config import Config
from tasn.model import build_loss
from tasn.model.network import BaselineOutput, TASNOutput
from tasn.training import train
from tasn.training.diagnose import TAG, ChanceWatch, chance_loss
from tasn.training.stage import warn


@pytest.mark.parametrize("kind", ["tasn", "baseline"])
def test_the_chance_value_is_the_loss_of_uniform_predictions(kind):
    cfg = Config()
    cfg.model.kind = kind
    cfg.loss.w_part, cfg.loss.w_distill = 0.7, 2.0  # not the defaults: the weights are read, not assumed
    loss_fn = build_loss(cfg.model, cfg.loss, label_smoothing=0.1)
    zeros = torch.zeros(5, 7)
    out = TASNOutput(*[zeros] * 5) if kind == "tasn" else BaselineOutput(zeros)
    total, _ = loss_fn(out, torch.tensor([0, 3, 6, 2, 1]))
    assert chance_loss(cfg, 7) == pytest.approx(float(total), rel=1e-6)


def test_the_watch_warns_once_past_its_share_of_the_budget_and_at_the_end():
    cfg = Config()
    cfg.train.min_steps = 150  # the run had 200: twice that is the advice
    watch = ChanceWatch(cfg, classes=8, total_steps=200)
    chance = 4 * math.log(8)
    assert watch.after_epoch(90, 3, chance) is None  # before half of the budget: too early to say
    assert watch.after_epoch(100, 4, 0.9 * chance) is None  # learning
    first = watch.after_epoch(100, 4, 0.99 * chance)
    assert first is not None and "after epoch 4 (100 of 200 optimizer steps, 50 % of the budget)" in first
    assert "train.min_steps=400" in first and "train.lr=0.05" in first
    assert "model.att_size" not in first  # the attention net already reads the whole input
    cfg.model.att_size = 112
    assert "the attention net at the whole input (model.att_size=168)" in ChanceWatch(cfg, 8, 200).advice()
    assert watch.after_epoch(150, 6, chance) is None  # once
    assert watch.at_end(0.9 * chance, 0.3) is None
    end = watch.at_end(float("nan"), 0.125)
    assert end is not None and "test top-1 0.125 against chance 0.125: it learned nothing" in end
    cfg.train.chance_check = 0.0
    assert ChanceWatch(cfg, classes=8, total_steps=200).after_epoch(200, 8, chance) is None


def test_a_run_that_learns_nothing_says_so_and_tags_its_mlflow_run(smoke_data, tmp_path, caplog):  # noqa: F811
    cfg = smoke_config("tracking.enabled=false", "train.lr=1.0e-9", "train.picture_images=0", "train.resume=never")
    with caplog.at_level(logging.WARNING, logger="tasn"):
        train(cfg, smoke_data, tmp_path / "out")
    said = [r.getMessage() for r in caplog.records if r.name == "tasn.training.stage"]
    assert len(said) == 2, said
    assert "the model has learned nothing so far. Try: more optimizer steps" in said[0]
    assert "the run ended with its training loss" in said[1] and "it learned nothing" in said[1]
    tags: dict = {}
    loop = SimpleNamespace(ctx=SimpleNamespace(is_main=True), run=SimpleNamespace(set_tags=tags.update))
    warn(loop, said[1])
    assert tags == {TAG: said[1]}


def test_steps_where_the_attention_net_learns_alone_have_its_chance_value_only():
    """With train.attention_first, an epoch's chance value averages its steps': w_attention x ln K
    for the gated ones, the whole sum after (an epoch at the attention net's chance is at chance)."""
    cfg = Config()
    ln8 = math.log(8)
    watch = ChanceWatch(cfg, classes=8, total_steps=100, gated_steps=30)
    assert watch.after_epoch(20, 1, 0.99 * ln8) is None  # too early to say
    assert watch.chance == pytest.approx(ln8)  # all 20 steps gated: the attention term alone
    watch.after_epoch(40, 2, 3.0)
    assert watch.chance == pytest.approx(0.5 * ln8 + 0.5 * 4 * ln8)  # 10 of its 20 steps gated
    said = watch.after_epoch(60, 3, 4 * ln8)
    assert watch.chance == pytest.approx(4 * ln8) and said is not None and f"chance value {4 * ln8:.3f}" in said
