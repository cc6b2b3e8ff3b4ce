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


# AlexNet's PCA lighting noise: the eigen-decomposition of ImageNet's RGB covariance (pixels in
# [0, 1]; MXNet's ImageRecordIter uses the same values times 255).
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class Lighting:
    """Add `eigvec @ (alpha * eigval)` to every pixel, alpha ~ N(0, std) per image and component:
    a random shift along the principal colour axes (the authors' `pca_noise = 0.1`)."""

    def __init__(self, std: float):
        self.std = std
        self.eigval, self.eigvec = torch.tensor(EIGVAL), torch.tensor(EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def train_transform(input_size: int, jitter: float = 0.4, rotation: float = 30.0, lighting: float = 0.1) -> T.Compose:
    """The authors' augmentation (MXNet's ImageRecordIter in their train.py), in their order:
    rotation up to `rotation` degrees of the whole image with white corners, random `input_size`
    crop (zero-padded when the image is smaller), horizontal flip, brightness/contrast/saturation
    jitter of strength `jitter`, PCA lighting noise of strength `lighting`. A zero turns a step off."""
    steps: list = []
    if rotation > 0:
        steps.append(T.RandomRotation(rotation, interpolation=T.InterpolationMode.BILINEAR, fill=255))
    steps += [T.RandomCrop(input_size, pad_if_needed=True), T.RandomHorizontalFlip()]
    if jitter > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    steps.append(T.ToTensor())
    if lighting > 0:
        steps.append(Lighting(lighting))
    return T.Compose(steps + [T.Normalize(MEAN, STD)])


def eval_transform(input_size: int, resize: int | None = None) -> T.Compose:
    """Centre `input_size` crop; `resize` first scales the shorter side (for raw, unprepared images)."""
    steps: list = []
    if resize:
        steps.append(T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True))
    steps.append(T.CenterCrop(input_size))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def denormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Undo `Normalize(MEAN, STD)` on a (3, H, W) or (B, 3, H, W) tensor; result clamped to [0, 1]."""
    shape = (3, 1, 1) if tensor.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(MEAN, dtype=tensor.dtype, device=tensor.device).view(shape)
    std = torch.tensor(STD, dtype=tensor.dtype, device=tensor.device).view(shape)
    return (tensor * std + mean).clamp(0.0, 1.0)
