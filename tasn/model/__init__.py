"""TASN: attention net, trilinear attention, attention sampler, network and losses.

Importable with torch and torchvision alone (no MLOps stack), so GPU hosts can use it as is.
"""

from tasn.model.attention import AttentionNet, trilinear_attention
from tasn.model.losses import BaselineLoss, TASNLoss, build_loss, distillation
from tasn.model.network import TASN, Baseline, BaselineOutput, TASNExtras, TASNOutput, build_model
from tasn.model.sampler import attention_sample, reference_attention_sample, sampling_grid

__all__ = [
    "AttentionNet",
    "Baseline",
    "BaselineLoss",
    "BaselineOutput",
    "TASN",
    "TASNExtras",
    "TASNLoss",
    "TASNOutput",
    "attention_sample",
    "build_loss",
    "build_model",
    "distillation",
    "reference_attention_sample",
    "sampling_grid",
    "trilinear_attention",
]
