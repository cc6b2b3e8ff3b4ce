"""Loss terms against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tasn.config import LossConfig, ModelConfig
from tasn.model.losses import BaselineLoss, TASNLoss, build_loss, distillation
from tasn.model.network import BaselineOutput, TASNOutput


def ce(logits: list[float], target: int) -> float:
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def soft_ce(student: list[float], teacher: list[float], t: float) -> float:
    zt = sum(math.exp(v / t) for v in teacher)
    zs = sum(math.exp(v / t) for v in student)
    return -sum(math.exp(a / t) / zt * (b / t - math.log(zs)) for a, b in zip(teacher, student))


HEADS = {
    "attention": [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]],
    "part": [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]],
    "master": [[0.3, 1.2, -0.4], [1.0, 2.0, 3.0]],
    "part_aux": [[0.0, 0.0, 4.0], [-2.0, 1.0, 0.0]],
    "master_aux": [[1.5, -0.5, 0.0], [0.2, 0.1, 0.0]],
}
TARGET = [1, 2]


def test_distillation_matches_hand_computation():
    student, teacher = HEADS["master"], HEADS["part"]
    want = sum(soft_ce(s, t, 10.0) for s, t in zip(student, teacher)) / 2
    got = distillation(torch.tensor(student), torch.tensor(teacher), 10.0)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_tasn_loss_terms_and_weighted_total():
    out = TASNOutput(**{k: torch.tensor(v) for k, v in HEADS.items()})
    total, terms = TASNLoss()(out, torch.tensor(TARGET))
    want = {k: sum(ce(row, t) for row, t in zip(v, TARGET)) / 2 for k, v in HEADS.items()}
    want["distill"] = sum(soft_ce(s, t, 10.0) for s, t in zip(HEADS["master"], HEADS["part"])) / 2
    assert set(terms) == set(want)
    for key in want:
        assert terms[key].item() == pytest.approx(want[key], rel=1e-6), key
    weights = {"attention": 1.0, "part": 0.5, "master": 0.5, "part_aux": 0.5, "master_aux": 0.5, "distill": 1.0}
    assert total.item() == pytest.approx(sum(weights[k] * want[k] for k in want), rel=1e-6)


def test_configurable_temperature_and_weights():
    out = TASNOutput(**{k: torch.tensor(v) for k, v in HEADS.items()})
    loss = TASNLoss(temperature=2.0, w_attention=0.0, w_part=0.0, w_master=0.0, w_part_aux=0.0, w_master_aux=0.0)
    total, _ = loss(out, torch.tensor(TARGET))
    want = sum(soft_ce(s, t, 2.0) for s, t in zip(HEADS["master"], HEADS["part"])) / 2
    assert total.item() == pytest.approx(want, rel=1e-6)


def test_distillation_teaches_master_only():
    part = torch.tensor(HEADS["part"], requires_grad=True)
    master = torch.tensor(HEADS["master"], requires_grad=True)
    distillation(master, part, 10.0).backward()
    assert part.grad is None and master.grad.abs().sum() > 0


def test_baseline_loss_is_plain_cross_entropy():
    logits = HEADS["master_aux"]
    total, terms = BaselineLoss()(BaselineOutput(torch.tensor(logits)), torch.tensor(TARGET))
    want = sum(ce(row, t) for row, t in zip(logits, TARGET)) / 2
    assert total.item() == pytest.approx(want, rel=1e-6) and set(terms) == {"logits"}


# Non-unit weights, each different, so that a weight dropped or swapped (w_distill read as 1.0, a
# term summed unweighted) changes the total.
WEIGHTS = {"w_attention": 0.7, "w_part": 1.9, "w_master": 0.3, "w_part_aux": 2.6, "w_master_aux": 0.45,
           "w_distill": 3.2}


def hand_terms(temperature: float) -> dict[str, float]:
    terms = {k: sum(ce(row, t) for row, t in zip(v, TARGET)) / 2 for k, v in HEADS.items()}
    terms["distill"] = sum(soft_ce(s, t, temperature) for s, t in zip(HEADS["master"], HEADS["part"])) / 2
    return terms


def weighted_total(weights: dict[str, float], temperature: float) -> float:
    return sum(weights[f"w_{k}"] * v for k, v in hand_terms(temperature).items())


def test_every_weight_scales_its_own_term():
    out = TASNOutput(**{k: torch.tensor(v) for k, v in HEADS.items()})
    total, _ = TASNLoss(temperature=3.0, **WEIGHTS)(out, torch.tensor(TARGET))
    assert total.item() == pytest.approx(weighted_total(WEIGHTS, 3.0), rel=1e-6)
    only_distill = {k: (v if k == "w_distill" else 0.0) for k, v in WEIGHTS.items()}
    total, _ = TASNLoss(temperature=3.0, **only_distill)(out, torch.tensor(TARGET))
    assert total.item() == pytest.approx(3.2 * hand_terms(3.0)["distill"], rel=1e-6)


def test_loss_built_from_the_config_uses_every_weight():
    out = TASNOutput(**{k: torch.tensor(v) for k, v in HEADS.items()})
    loss_cfg = LossConfig(temperature=4.0, **WEIGHTS)
    for loss in (TASNLoss.from_config(loss_cfg), build_loss(ModelConfig(kind="tasn"), loss_cfg)):
        assert isinstance(loss, TASNLoss)
        total, _ = loss(out, torch.tensor(TARGET))
        assert total.item() == pytest.approx(weighted_total(WEIGHTS, 4.0), rel=1e-6)
    baseline = build_loss(ModelConfig(kind="baseline"), loss_cfg)
    logits = HEADS["master_aux"]
    total, _ = baseline(BaselineOutput(torch.tensor(logits)), torch.tensor(TARGET))
    assert isinstance(baseline, BaselineLoss)
    assert total.item() == pytest.approx(sum(ce(row, t) for row, t in zip(logits, TARGET)) / 2, rel=1e-6)
