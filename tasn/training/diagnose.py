"""Saying when a run has learned nothing, and what to try, instead of ending silently at chance.

A network that predicts every class alike has a known training loss: each cross-entropy term is
ln K for K classes (label smoothing changes nothing at the uniform prediction), and distillation
between two uniform heads is ln K as well, so TASN's chance value is (the sum of its loss weights)
x ln K and the baseline's ln K (`chance_loss`). An epoch whose mean training loss is still within
`CHANCE_BAND` of it has learned nothing a loss can show. `ChanceWatch` looks after every epoch
once `train.chance_check` of the step budget is spent, warns once (log and MLflow tag), and says
again at the end if the run finished that way. While TASN's attention net learns alone
(`train.attention_first`) only its own term counts, so those steps' chance value is w_attention x ln K.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tasn.config import Config

log = logging.getLogger(__name__)

CHANCE_BAND = 0.03  # a training loss above 97 % of its chance value has not moved from it
TAG = "tasn.learned_nothing"  # the MLflow tag set on such a run


def chance_loss(cfg: Config, classes: int, attention_alone: bool = False) -> float:
    """The training loss of a model that predicts uniformly over `classes` classes (TASN's while
    its attention net learns alone, when `attention_alone`)."""
    if cfg.model.kind == "baseline":
        return math.log(classes)
    w = cfg.loss
    if attention_alone:
        return w.w_attention * math.log(classes)
    return (w.w_attention + w.w_part + w.w_master + w.w_part_aux + w.w_master_aux + w.w_distill) * math.log(classes)


@dataclass
class ChanceWatch:
    """Watches the per-epoch training loss against its chance value over a budget of `total_steps`."""

    cfg: Config
    classes: int
    total_steps: int
    gated_steps: int = 0  # the first steps, in which TASN's attention net learns alone
    epoch_start: int = 0  # the step the next epoch starts at (the resume position)
    warned: bool = False

    def __post_init__(self) -> None:
        self.chance = chance_loss(self.cfg, self.classes)

    def epoch_chance(self, first: int, last: int) -> float:
        """The chance value of the epoch of steps (first, last]: its steps' values, averaged."""
        alone = max(0, min(self.gated_steps, last) - first) / max(1, last - first)
        return (alone * chance_loss(self.cfg, self.classes, attention_alone=True)
                + (1 - alone) * chance_loss(self.cfg, self.classes))

    def at_chance(self, train_loss: float) -> bool:
        return not train_loss < (1 - CHANCE_BAND) * self.chance  # a NaN loss has learned nothing either

    def after_epoch(self, step: int, epoch: int, train_loss: float) -> str | None:
        """The warning, once, when `step` is past `train.chance_check` of the budget and the
        epoch's training loss is still at chance; else None."""
        self.chance, self.epoch_start = self.epoch_chance(self.epoch_start, step), step
        share = self.cfg.train.chance_check
        if self.warned or not share or step < share * self.total_steps or not self.at_chance(train_loss):
            return None
        self.warned = True
        share = 100 * step / self.total_steps
        return (f"after epoch {epoch} ({step} of {self.total_steps} optimizer steps, {share:.0f} % of the budget) "
                f"the training loss {train_loss:.3f} is still at its chance value "
                f"{self.chance:.3f} ({self.classes} classes): the model has learned nothing so far. {self.advice()}")

    def at_end(self, train_loss: float, top1: float | None) -> str | None:
        """The closing warning when the run ended with its training loss at chance."""
        if not self.at_chance(train_loss):
            return None
        acc = f", test top-1 {top1:.3f} against chance {1 / self.classes:.3f}" if top1 is not None else ""
        return (f"the run ended with its training loss {train_loss:.3f} at its chance value {self.chance:.3f}"
                f"{acc}: it learned nothing. {self.advice()}")

    def advice(self) -> str:
        t, m = self.cfg.train, self.cfg.model
        tips = [f"more optimizer steps (train.min_steps={max(2 * t.min_steps, 2 * self.total_steps)} or more "
                f"train.epochs; this run had {self.total_steps})",
                f"a smaller learning rate (train.lr={t.lr / 2:g})"]
        if m.pretrained in ("", "none"):
            tips.append("ImageNet weights where the backbone has them (model.pretrained=imagenet, "
                        "model.att_pretrained=imagenet)")
        if m.kind == "tasn" and m.att_size < m.input_size:
            tips.append(f"the attention net at the whole input (model.att_size={m.input_size}), where what tells the "
                        f"classes apart is finer than a resize to {m.att_size} keeps")
        tips.append("labels that match the images (the report of `tasn validate`, the contact sheet)")
        return "Try: " + "; ".join(tips) + " (docs/training.md, 'When a run learns nothing')."
