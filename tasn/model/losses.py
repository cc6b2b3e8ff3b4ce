"""TASN's training objective (docs/method.md step 6): five cross-entropies and the feature distiller."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasn.choices import DISTILL_TEACHERS

if TYPE_CHECKING:  # the config is not needed to use the losses, only to type the factories
    from tasn.config import LossConfig, ModelConfig


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                 teacher_grad: str = "authors") -> torch.Tensor:
    """Soft-target cross-entropy -sum softmax(teacher / T) * log_softmax(student / T), batch mean.

    `teacher_grad`: "authors" lets the gradient through softmax(teacher / T), as the authors'
    MXNet code does (no BlockGrad there): distillation then also pulls the part head, and through
    it the shared backbone, towards the master head. "detached" makes the soft targets constants,
    as in classic knowledge distillation: only the student (the master head) learns from them.
    """
    if teacher_grad not in DISTILL_TEACHERS:
        raise ValueError(f"loss.distill_teacher: {teacher_grad!r} is not one of {', '.join(DISTILL_TEACHERS)}")
    teacher = teacher.detach() if teacher_grad == "detached" else teacher
    soft = torch.softmax(teacher.float() / temperature, dim=1)
    return -(soft * torch.log_softmax(student.float() / temperature, dim=1)).sum(dim=1).mean()


class TASNLoss(nn.Module):
    """Weighted sum of the five CE terms and distillation; returns (total, {term: value})."""

    def __init__(
        self,
        temperature: float = 10.0,
        w_attention: float = 1.0,
        w_part: float = 0.5,
        w_master: float = 0.5,
        w_part_aux: float = 0.5,
        w_master_aux: float = 0.5,
        w_distill: float = 1.0,
        *, distill_teacher: str = "authors", label_smoothing: float = 0.0,  # the recipe's, by name only
    ):
        super().__init__()
        self.temperature = temperature
        self.distill_teacher, self.label_smoothing = distill_teacher, label_smoothing
        # Scales every term but the attention net's own: 0 while the attention net learns first
        # (train.attention_first, set by the training loop), 1 after.
        self.branches = 1.0
        self.weights = {
            "attention": w_attention,
            "part": w_part,
            "master": w_master,
            "part_aux": w_part_aux,
            "master_aux": w_master_aux,
            "distill": w_distill,
        }

    @classmethod
    def from_config(cls, cfg: LossConfig, label_smoothing: float = 0.0) -> TASNLoss:
        return cls(**{k: getattr(cfg, k) for k in ("temperature", "w_attention", "w_part", "w_master",
                                                     "w_part_aux", "w_master_aux", "w_distill", "distill_teacher")},
                   label_smoothing=label_smoothing)

    def forward(self, out, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = {head: F.cross_entropy(getattr(out, head).float(), target, label_smoothing=self.label_smoothing)
                 for head in out._fields}
        terms["distill"] = distillation(out.master, out.part, self.temperature, self.distill_teacher)
        total = cast(torch.Tensor, sum(self.weights[k] * (1.0 if k == "attention" else self.branches) * v
                                       for k, v in terms.items()))
        return total, terms


class BaselineLoss(nn.Module):
    """Plain cross-entropy, with the same (total, terms) interface as TASNLoss."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(out.logits.float(), target, label_smoothing=self.label_smoothing)
        return ce, {"logits": ce}


def build_loss(model_cfg: ModelConfig, loss_cfg: LossConfig, label_smoothing: float = 0.0) -> nn.Module:
    """The objective of `model_cfg.kind`; `label_smoothing` (train.label_smoothing) applies to
    every cross-entropy term, not to distillation (its soft targets are already smooth)."""
    if model_cfg.kind == "baseline":
        return BaselineLoss(label_smoothing)
    return TASNLoss.from_config(loss_cfg, label_smoothing)
