"""TASN's image transforms: train-time augmentation and the deterministic eval crop.

The network sees a fixed-size crop (`model.input_size`) of an image whose shorter side was resized by
`tasn preprocess`; nothing here looks at bounding boxes. Normalisation uses the ImageNet statistics
so that ImageNet-pretrained backbones (the authors' CUB recipe) get the inputs they were trained on.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor() -> list:
    return [T.ToTensor(), T.Normalize(MEAN, STD)]


def train_transform(input_size: int, jitter: float = 0.4, rotation: float = 30.0) -> T.Compose:
    """Random `input_size` crop (zero-padded when the image is smaller), horizontal flip,
    brightness/contrast/saturation jitter of strength `jitter`, rotation up to `rotation` degrees."""
    steps: list = [T.RandomCrop(input_size, pad_if_needed=True), T.RandomHorizontalFlip()]
    if jitter > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    if rotation > 0:
        steps.append(T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR))
    return T.Compose(steps + _to_normalized_tensor())


def eval_transform(input_size: int, resize: int | None = None) -> T.Compose:
    """Centre `input_size` crop; `resize` first scales the shorter side (for raw, unprepared images)."""
    steps: list = []
    if resize:
        steps.append(T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True))
    steps.append(T.CenterCrop(input_size))
    return T.Compose(steps + _to_normalized_tensor())


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Undo `Normalize(MEAN, STD)` on a (3, H, W) or (B, 3, H, W) tensor; result clamped to [0, 1]."""
    shape = (3, 1, 1) if tensor.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(MEAN, dtype=tensor.dtype, device=tensor.device).view(shape)
    std = torch.tensor(STD, dtype=tensor.dtype, device=tensor.device).view(shape)
    return (tensor * std + mean).clamp(0.0, 1.0)
