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


def smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    """Label smoothing: (1 - eps) x CE(target) + eps x the mean over classes of CE(class)."""
    return (1 - eps) * ce(logits, target) + eps * sum(ce(logits, k) for k in range(len(logits))) / len(logits)


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


def _softmax(row: list[float], t: float) -> list[float]:
    z = sum(math.exp(v / t) for v in row)
    return [math.exp(v / t) / z for v in row]


def distill_grads(student: list[list[float]], teacher: list[list[float]], t: float):
    """By hand, for the batch mean of -sum p log q with p = softmax(teacher / T), q = softmax(student / T):
    d/d student_j = (q_j - p_j) / (T n); d/d teacher_j = -p_j (log q_j - sum_i p_i log q_i) / (T n)."""
    n = len(student)
    g_student, g_teacher = [], []
    for s_row, t_row in zip(student, teacher):
        p, q = _softmax(t_row, t), _softmax(s_row, t)
        log_q = [math.log(v) for v in q]
        mean_log_q = sum(pi * lq for pi, lq in zip(p, log_q))
        g_student.append([(qj - pj) / (t * n) for qj, pj in zip(q, p)])
        g_teacher.append([-pj * (lq - mean_log_q) / (t * n) for pj, lq in zip(p, log_q)])
    return g_student, g_teacher


@pytest.mark.parametrize("mode", ["authors", "detached"])
@pytest.mark.parametrize("temperature", [10.0, 1.5])
def test_distillation_gradients_match_hand_computation(mode, temperature):
    part = torch.tensor(HEADS["part"], dtype=torch.float64, requires_grad=True)
    master = torch.tensor(HEADS["master"], dtype=torch.float64, requires_grad=True)
    distillation(master, part, temperature, teacher_grad=mode).backward()
    want_master, want_part = distill_grads(HEADS["master"], HEADS["part"], temperature)
    for got, want in zip(master.grad.tolist(), want_master):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-8)  # float32 inside
    if mode == "detached":  # the soft targets are constants: the part head gets nothing
        assert part.grad is None
    else:  # the authors' loss has no BlockGrad: the teacher is pulled towards the student too
        for got, want in zip(part.grad.tolist(), want_part):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-8)  # float32 inside
        assert part.grad.abs().sum() > 0


def test_distillation_mode_reaches_the_shared_backbone_only_when_asked():
    """Through TASNLoss: with w_distill alone, the part logits get a gradient in `authors` mode only."""
    for mode, flows in (("authors", True), ("detached", False)):
        logits = {k: torch.tensor(v, requires_grad=True) for k, v in HEADS.items()}
        loss = TASNLoss(w_attention=0.0, w_part=0.0, w_master=0.0, w_part_aux=0.0, w_master_aux=0.0,
                        distill_teacher=mode)
        loss(TASNOutput(**logits), torch.tensor(TARGET))[0].backward()
        assert bool(logits["part"].grad.abs().sum() > 0) == flows, mode  # w_part = 0: only distillation
        assert logits["master"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss.distill_teacher: 'both' is not one of authors, detached"):
        distillation(torch.zeros(1, 3), torch.zeros(1, 3), 10.0, teacher_grad="both")


def test_label_smoothing_applies_to_every_cross_entropy_but_not_distillation():
    out = TASNOutput(**{k: torch.tensor(v) for k, v in HEADS.items()})
    eps = 0.1
    _, terms = TASNLoss(label_smoothing=eps)(out, torch.tensor(TARGET))
    for head, rows in HEADS.items():
        want = sum(smoothed_ce(row, t, eps) for row, t in zip(rows, TARGET)) / 2
        assert terms[head].item() == pytest.approx(want, rel=1e-6), head
    want = sum(soft_ce(s, t, 10.0) for s, t in zip(HEADS["master"], HEADS["part"])) / 2
    assert terms["distill"].item() == pytest.approx(want, rel=1e-6)
    total, _ = BaselineLoss(label_smoothing=eps)(BaselineOutput(torch.tensor(HEADS["part"])), torch.tensor(TARGET))
    want = sum(smoothed_ce(row, t, eps) for row, t in zip(HEADS["part"], TARGET)) / 2
    assert total.item() == pytest.approx(want, rel=1e-6)


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
