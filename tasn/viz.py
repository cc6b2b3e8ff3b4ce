"""Pictures people look at instead of numbers: where TASN attends, what its sampler made of the
image, and how training went. matplotlib with the Agg backend (no display needed); every function
returns a Figure that the caller saves or logs to MLflow.
"""

from __future__ import annotations

import io
import os
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from tasn.data.transforms import denormalize
from tasn.io import atomic_write_bytes

matplotlib.use("Agg")  # no display; set before any figure exists


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) array in [0, 1] for imshow."""
    return denormalize(image.detach().float().cpu()).permute(1, 2, 0).numpy()


def _upsampled(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(n, h, w) maps -> (n, size, size), each scaled to [0, 1] for display."""
    up = F.interpolate(maps.detach().float().cpu().unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True)
    up = up.squeeze(1).clamp_min(0)
    peak = up.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return up / peak


def attention_figure(images: torch.Tensor, extras: Any, titles: list[str] | None = None,
                     columns_title: str = "") -> Figure:
    """One row per image: the input, the structure and detail attention maps over it, and the
    structure- and details-preserved samples the shared backbone actually sees.

    `images`: (n, 3, S, S) normalised input; `extras`: a `tasn.model.TASNExtras` for them.
    """
    n, size = images.shape[0], images.shape[-1]
    structure = _upsampled(extras.structure_map, size) ** 2  # the sampler squares this one
    detail = _upsampled(extras.detail_map, size)
    heads = ["input", "structure attention", "detail attention", "structure-preserved", "details-preserved"]
    fig, axes = plt.subplots(n, len(heads), figsize=(2.3 * len(heads), 2.3 * n), squeeze=False)
    for i in range(n):
        rgb = _rgb(images[i])
        panels = [
            (rgb, None),
            (rgb, structure[i].numpy()),
            (rgb, detail[i].numpy()),
            (_rgb(extras.structure_images[i]), None),
            (_rgb(extras.detail_images[i]), None),
        ]
        for j, (picture, overlay) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(picture)
            if overlay is not None:
                ax.imshow(overlay, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=9)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    if columns_title:
        fig.suptitle(columns_title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curves(history: list[dict[str, Any]], primary_head: str) -> Figure:
    """Loss (train, val) and top-1 accuracy per head against the epoch, from history.csv rows."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key in [k for k in history[0] if k.endswith("_top1")] if history else []:
        head = key[: -len("_top1")]
        ax_acc.plot(epochs, [row[key] for row in history], marker="o", label=head,
                    linewidth=2.5 if head == primary_head else 1.0)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(conf: torch.Tensor, classes: list[str], title: str) -> Figure:
    """Row-normalised confusion matrix, class names on both axes, counts written in when few."""
    n = len(classes)
    font = max(3.0, min(9.0, 360.0 / max(n, 1)))
    labels_in = 0.6 * font / 72 * max(len(c) for c in classes)  # room the tick labels take
    side = min(30.0, 0.3 * n + labels_in + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side), layout="constrained")
    rows = conf.double() / conf.sum(dim=1, keepdim=True).clamp_min(1)
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=font,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the actual class")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is freed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write a PNG atomically and free the figure."""
    atomic_write_bytes(path, png_bytes(fig))
