"""The names a configuration value may take, one registry per kind of name.

Each kind is a `Literal` type (what the config's dataclass fields are annotated with, so the loader
and the type checker both know the allowed values) and the tuple of its values (what the code that
dispatches on the name checks against). The model, the sampler and the training loop import their
tuple from here, the config its `Literal`: a new backbone is added in one place. This module imports
nothing but `typing`, so `tasn.model` and `tasn.ops` can use it without the MLOps stack.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelKind = Literal["tasn", "baseline"]
# The shared (part/master) backbone. `resnet18-slim` is ResNet-18 at a quarter of its widths.
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet18-slim"]
# The attention net's trunk: BasicBlock ResNets only (its stride surgery and 512-channel head assume them).
AttentionBackbone = Literal["resnet18", "resnet34", "resnet18-slim"]
# The attention net's output stride: 8, the authors' (stages 2 and 4 at stride 1: 224 -> 28 x 28 maps),
# or 16 (stage 4 only: a quarter of the trunk's compute, so it can read the whole input on a CPU).
AttentionStride = Literal[8, 16]
# torchvision's ImageNet weights for `model.pretrained: imagenet`: V1, the classic recipe (ResNet-50 76.1%
# top-1; the authors' MXNet ResNet-50 is of that kind), or V2, torchvision's 2021 recipe (ResNet-50 80.9%).
PretrainedWeights = Literal["IMAGENET1K_V1", "IMAGENET1K_V2"]
# The versions torchvision has per architecture (ResNet-18 and -34: V1 only; the slim net: none).
IMAGENET_WEIGHTS: dict[str, tuple[str, ...]] = {
    "resnet18": ("IMAGENET1K_V1",),
    "resnet34": ("IMAGENET1K_V1",),
    "resnet50": ("IMAGENET1K_V1", "IMAGENET1K_V2"),
}
# BatchNorm while training: per process, synchronised across processes (CUDA), or frozen running stats.
BatchNormMode = Literal["local", "sync", "frozen"]
# The attention sampler: the fused CUDA op when available, the PyTorch reference, or the op (required).
SamplerImpl = Literal["auto", "reference", "fused"]
# Fashion-MNIST's labels 0-9 in its order, as directory-safe names (`tasn data fashion`'s classes).
FashionLabel = Literal["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle_boot"]
# What a details set shows at low resolution (`tasn data details`): a plain card under the textured
# part (where to look, no label), the card and the part's own outline (one factor of the class), the
# part alone among the clutter (its mean colour), or nothing (a zero-mean texture over the clutter).
DetailsCue = Literal["card", "shape", "blob", "none"]
# The optimizer: the authors' plain SGD (momentum optional), or AdamW.
Optimizer = Literal["sgd", "adamw"]
# The learning-rate schedule after the warm-up: x gamma at each milestone epoch, or cosine to 0.
Schedule = Literal["step", "cosine"]
# Distillation's soft targets softmax(part / T): with their gradient (the authors' code), or constants.
DistillTeacher = Literal["authors", "detached"]
# Whether `tasn register` makes a version: auto (every run but a DVC experiment's), or always / never.
RegisterWhen = Literal["auto", True, False]

MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
BACKBONES: tuple[str, ...] = get_args(Backbone)
ATTENTION_BACKBONES: tuple[str, ...] = get_args(AttentionBackbone)
ATTENTION_STRIDES: tuple[int, ...] = get_args(AttentionStride)
PRETRAINED_WEIGHTS: tuple[str, ...] = get_args(PretrainedWeights)
BATCHNORM_MODES: tuple[str, ...] = get_args(BatchNormMode)
SAMPLER_IMPLS: tuple[str, ...] = get_args(SamplerImpl)
FASHION_LABELS: tuple[str, ...] = get_args(FashionLabel)
DETAILS_CUES: tuple[str, ...] = get_args(DetailsCue)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
DISTILL_TEACHERS: tuple[str, ...] = get_args(DistillTeacher)
