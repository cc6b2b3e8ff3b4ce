"""Running means of the training scalars, in the shape of torchvision's `MetricLogger`.

`update(images, loss=..., loss_part=...)` after each micro-batch; `means()` averages each scalar
over the updates since the last `reset()` and over the ranks (one collective for all of them), and
`images_per_s()` is the global throughput over the same span. Values stay on the device as float64
tensors until read, so updating never synchronises with the GPU.
"""

from __future__ import annotations

import time

import torch

from tasn import distributed


class MetricLogger:
    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.images = 0
        self.start = time.perf_counter()

    def update(self, images: int, **values: torch.Tensor) -> None:
        """One micro-batch of `images` images (all ranks together) and its scalars."""
        for name, value in values.items():
            total = self.sums.get(name)
            v = value.detach().double()
            self.sums[name] = v if total is None else total + v
        self.count += 1
        self.images += images

    def means(self) -> dict[str, float]:
        """Each scalar's mean over the updates since the reset, averaged over the ranks."""
        local = {name: float(total) / max(self.count, 1) for name, total in self.sums.items()}
        return distributed.mean_over_ranks(local, self.device)

    def images_per_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0
