"""ResNet backbones with ImageNet weights on request, from torchvision or a local/S3 file.

No download happens unless `pretrained="imagenet"` is asked for; tests never ask.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from tasn.choices import BACKBONES, IMAGENET_WEIGHTS
from tasn.errors import ConfigError, TASNError, shown
from tasn.storage import read_bytes

log = logging.getLogger(__name__)


def _state_dict_from(source: str) -> dict[str, torch.Tensor]:
    """A state dict from a local path or an s3:// URI (a plain state dict or {"model": ...});
    a ConfigError naming the file when it is not one torch can read without running code."""
    if not source.startswith("s3://") and not Path(source).is_file():
        raise FileNotFoundError(f"pretrained weights: no file at {source}")
    try:
        state = torch.load(io.BytesIO(read_bytes(source)), map_location="cpu", weights_only=True)
    except (OSError, TASNError):  # no such object, no access: said by storage already
        raise
    except Exception as exc:  # pickle, zip and torch raise many types for a file that is not a state dict
        raise ConfigError(f"pretrained weights {source!r}: not a state dict torch can read "
                          f"({shown(str(exc))})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ConfigError(f"pretrained weights {source!r}: not a state dict (name -> tensor), "
                          f"got {type(state).__name__}")
    return state


class SlimResNet(torchvision.models.ResNet):
    """ResNet-18's layout at a quarter of its channels (16-32-64-128): ~16x fewer FLOPs, for CPU
    demos and tests. torchvision hard-codes the widths, so the stem and stages are built here with
    its own `_make_layer`; forward and the stride surgery of the attention net work unchanged."""

    widths = (16, 32, 64, 128)

    def __init__(self, layers=(2, 2, 2, 2), zero_init_residual: bool = False):
        nn.Module.__init__(self)
        w = self.widths
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = w[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block = torchvision.models.resnet.BasicBlock
        self.layer1 = self._make_layer(block, w[0], layers[0])
        self.layer2 = self._make_layer(block, w[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, w[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, w[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w[3], 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # as torchvision's ResNet does it
            for m in self.modules():
                if isinstance(m, torchvision.models.resnet.BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


def imagenet_weights(arch: str, version: str = "IMAGENET1K_V1") -> str:
    """torchvision's name of `arch`'s ImageNet weights of `version` (e.g. "ResNet50_Weights.IMAGENET1K_V1")."""
    versions = IMAGENET_WEIGHTS.get(arch, ())
    if not versions:
        raise ValueError(f"no ImageNet weights exist for {arch}; use pretrained: none or a file")
    if version not in versions:
        raise ValueError(f"torchvision has no {version} weights for {arch} (it has {', '.join(versions)})")
    return f"ResNet{arch.removeprefix('resnet')}_Weights.{version}"


def build_resnet(arch: str, pretrained: str = "none", zero_init_residual: bool = False,
                 weights: str = "IMAGENET1K_V1") -> torchvision.models.ResNet:
    """A torchvision ResNet; `pretrained`: "none", "imagenet" (torchvision's weights API, version
    `weights`, downloaded to the torch hub cache on first use) or a path / s3:// URI of a state dict.

    `zero_init_residual` starts the last BatchNorm of every residual block at zero, so each block
    begins as the identity and a deep net from random weights trains like a shallow one at first
    (Goyal et al. 2017); loaded weights replace it.
    """
    if arch not in BACKBONES:
        raise ValueError(f"backbone {arch!r} is not one of {', '.join(BACKBONES)}")
    if arch == "resnet18-slim":
        model = SlimResNet(zero_init_residual=zero_init_residual)
    else:
        model = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if pretrained in ("", "none", None):
        return model
    if pretrained == "imagenet":
        name = imagenet_weights(arch, weights)
        state = torchvision.models.get_weight(name).get_state_dict(progress=True)
        pretrained = f"imagenet ({name})"
    else:
        state = _state_dict_from(pretrained)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"pretrained weights {pretrained!r} do not fit {arch}: {shown(str(exc))}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(
            f"pretrained weights {pretrained!r} do not fit {arch}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("loaded %s weights for %s", pretrained, arch)
    return model


# MXNet's MSRAPrelu initializer: Xavier-gaussian over the average fan with magnitude 2 / (1 + a^2),
# a = 0.25 (the PReLU slope it is named for).
MSRA_PRELU_GAIN = math.sqrt(2.0 / (1.0 + 0.25**2))


def authors_init(*modules: nn.Module) -> None:
    """The authors' init for TASN's new layers, as their MXNet code does it: every conv (the
    attention head's) MSRA-PReLU, i.e. normal with std sqrt(2 / (1 + 0.25^2) / ((fan_in + fan_out) / 2));
    every linear layer (the classifiers) He-normal, std sqrt(2 / fan_in) (their global initializer,
    Xavier gaussian over fan_in with magnitude 2); biases zero."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain=MSRA_PRELU_GAIN)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)
