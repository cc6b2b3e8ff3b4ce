"""One short CPU training run on generated images: the total loss falls."""

from __future__ import annotations

import torch

from tasn.model import TASN, TASNLoss


def generated_batch(n: int, classes: int, size: int, generator: torch.Generator):
    """Noise images, each with a small bright square whose position encodes the class."""
    x = torch.rand(n, 3, size, size, generator=generator) * 0.3
    y = torch.arange(n) % classes
    side = size // 8
    for i in range(n):
        r = (int(y[i]) * size) // classes
        x[i, :, r : r + side, r : r + side] = 1.0
    return (x - 0.5) / 0.25, y


def test_total_loss_falls_in_a_short_cpu_run():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = TASN(4, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=16,
                 att_size=32, out_size=32)
    loss_fn = TASNLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = generated_batch(12, 4, 64, g)
    losses = []
    for _ in range(20):
        total, _ = loss_fn(model(x), y)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses
