"""TASN's training objective (TASN.md step 6): five cross-entropies and the feature distiller."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # the config is not needed to use the losses, only to type the factories
    from tasn.config import LossConfig, ModelConfig


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target cross-entropy -sum softmax(teacher / T) * log_softmax(student / T), batch mean.

    The teacher (the part head) is detached: its soft targets are constants, as in knowledge
    distillation; the part head learns from its own labels.
    """
    soft = torch.softmax(teacher.detach().float() / temperature, dim=1)
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
    ):
        super().__init__()
        self.temperature = temperature
        self.weights = {
            "attention": w_attention,
            "part": w_part,
            "master": w_master,
            "part_aux": w_part_aux,
            "master_aux": w_master_aux,
            "distill": w_distill,
        }

    @classmethod
    def from_config(cls, cfg: LossConfig) -> TASNLoss:
        return cls(**{k: getattr(cfg, k) for k in ("temperature", "w_attention", "w_part", "w_master",
                                                     "w_part_aux", "w_master_aux", "w_distill")})

    def forward(self, out, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = {head: F.cross_entropy(getattr(out, head).float(), target) for head in out._fields}
        terms["distill"] = distillation(out.master, out.part, self.temperature)
        total = cast(torch.Tensor, sum(self.weights[k] * v for k, v in terms.items()))
        return total, terms


class BaselineLoss(nn.Module):
    """Plain cross-entropy, with the same (total, terms) interface as TASNLoss."""

    def forward(self, out, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = F.cross_entropy(out.logits.float(), target)
        return ce, {"logits": ce}


def build_loss(model_cfg: ModelConfig, loss_cfg: LossConfig) -> nn.Module:
    return BaselineLoss() if model_cfg.kind == "baseline" else TASNLoss.from_config(loss_cfg)
