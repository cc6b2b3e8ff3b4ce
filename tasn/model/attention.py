"""TASN's attention net and trilinear attention (docs/method.md, forward pass steps 1-2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasn.choices import ATTENTION_STRIDES
from tasn.model.backbones import authors_init, build_resnet

# The authors' constant: the spatial softmax in N(X) is taken over 7 * X.
SPATIAL_SCALE = 7.0


def trilinear_attention(x: torch.Tensor, scale: float = SPATIAL_SCALE) -> torch.Tensor:
    """M = N(N(X) X^T) X: c attention maps of X (n, c, h, w), each a mix of the feature channels
    weighted by their inter-channel relation. The first N is a softmax over space (of scale * X),
    the second a softmax over the last channel axis of the c x c relation."""
    n, c, h, w = x.shape
    xf = x.reshape(n, c, h * w)
    n1 = torch.softmax(scale * xf, dim=-1)
    relation = torch.softmax(torch.bmm(n1, xf.transpose(1, 2)), dim=-1)  # (n, c, c)
    return torch.bmm(relation, xf).reshape(n, c, h, w)


class MultiDilationHead(nn.Module):
    """Conv A at dilations 1 and 2, conv B at 1, 2 and 3; one weight per conv, branches summed.

    Shared weights across dilations see the same pattern at several scales without adding
    parameters, which is how the authors widen the receptive field of a stride-8 trunk.
    """

    dilations_a = (1, 2)
    dilations_b = (1, 2, 3)

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv_a = nn.Conv2d(in_channels, channels, 3, bias=True)
        self.conv_b = nn.Conv2d(channels, channels, 3, bias=True)

    @staticmethod
    def _branches(conv: nn.Conv2d, x: torch.Tensor, dilations) -> torch.Tensor:
        out = None
        for d in dilations:
            y = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=d, dilation=d))
            out = y if out is None else out + y
        assert out is not None  # at least one dilation
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._branches(self.conv_b, self._branches(self.conv_a, x, self.dilations_a), self.dilations_b)


class AttentionNet(nn.Module):
    """ResNet trunk at output stride 8 (the authors': stages 2 and 4 at stride 1, 224 -> 28x28) or
    16 (stage 4 alone at stride 1), the multi-dilation head, and a classifier (BN, ReLU, global
    average pool, FC) on its features.

    Stride 16 runs stages 2-4 on a quarter of the positions, so the net can read an image at 1.5x
    the side for less than stride 8 costs: what a from-scratch net on a CPU needs to see a fine
    texture at all (docs/training.md), at the price of maps half as fine."""

    def __init__(self, num_classes: int, arch: str = "resnet18", head_channels: int = 512, pretrained: str = "none",
                 zero_init_residual: bool = False, stride: int = 8):
        super().__init__()
        if stride not in ATTENTION_STRIDES:
            raise ValueError(f"the attention net's output stride must be one of {ATTENTION_STRIDES}, got {stride!r}")
        trunk = build_resnet(arch, pretrained, zero_init_residual)
        for stage in (trunk.layer2, trunk.layer4) if stride == 8 else (trunk.layer4,):
            block = stage[0]
            block.conv1.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        self.trunk = nn.Sequential(
            trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        )
        self.head = MultiDilationHead(trunk.fc.in_features, head_channels)
        self.bn = nn.BatchNorm2d(head_channels)
        self.fc = nn.Linear(head_channels, num_classes)
        authors_init(self.head, self.fc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, features X)."""
        feats = self.head(self.trunk(x))
        pooled = F.adaptive_avg_pool2d(F.relu(self.bn(feats)), 1).flatten(1)
        return self.fc(pooled), feats
