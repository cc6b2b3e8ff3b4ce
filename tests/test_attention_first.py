"""`train.attention_first`: TASN's sampling branches wait while the attention net learns alone."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from fixtures.data_smoke import smoke_config, smoke_data  # noqa: F401  (fixture)
from tasn.model.losses import TASNLoss
from tasn.model.network import TASNOutput
from tasn.training import train
from tasn.training.outputs import STEPS


def test_gated_branches_leave_the_attention_term_alone_and_send_no_gradient():
    torch.manual_seed(0)
    logits = {k: torch.randn(4, 5, requires_grad=True) for k in TASNOutput._fields}
    target = torch.tensor([0, 1, 4, 2])
    loss = TASNLoss(w_attention=0.7)
    loss.branches = 0.0
    total, terms = loss(TASNOutput(**logits), target)
    assert float(total.detach()) == pytest.approx(0.7 * float(terms["attention"]))
    total.backward()
    assert logits["attention"].grad.abs().sum() > 0
    for head in ("part", "master", "part_aux", "master_aux"):
        assert logits[head].grad.abs().sum() == 0, head
    loss.branches = 1.0  # back to the whole objective
    total, terms = loss(TASNOutput(**logits), target)
    assert loss.weights["attention"] == 0.7 and len(loss.weights) == 6
    assert float(total) == pytest.approx(sum(w * float(terms[k]) for k, w in loss.weights.items()))


def test_the_first_share_of_a_run_trains_the_attention_net_alone(smoke_data, tmp_path):  # noqa: F811
    """Six steps, attention_first 0.5: the logged loss is the attention term alone for steps 1-3
    (the branch terms are still computed and logged), the weighted sum of all six from step 4."""
    cfg = smoke_config("tracking.enabled=false", "train.picture_images=0", "train.resume=never",
                       "train.epochs=2", "train.attention_first=0.5")
    train(cfg, smoke_data, tmp_path / "out")
    weights = TASNLoss.from_config(cfg.loss).weights
    with (tmp_path / "out" / STEPS).open() as fh:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        whole = sum(w * row[f"loss_{k}"] for k, w in weights.items())
        alone = weights["attention"] * row["loss_attention"]
        expected = alone if row["step"] <= 3 else whole
        assert math.isclose(row["loss"], expected, rel_tol=1e-4), row
        assert whole > alone * 1.5  # the two readings differ: the check can tell them apart
