"""The TASN network (docs/method.md, forward pass steps 1-5, 7) and the plain baseline beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasn.model.attention import AttentionNet, trilinear_attention
from tasn.model.backbones import authors_init, build_resnet
from tasn.model.sampler import attention_sample, nonfinite_maps

if TYPE_CHECKING:  # the config is not needed to use the model, only to type build_model
    from tasn.config import ModelConfig


class TASNOutput(NamedTuple):
    """The five heads' logits. `master_aux` (shared head on the structure image) is the prediction."""

    attention: torch.Tensor
    part: torch.Tensor
    master: torch.Tensor
    part_aux: torch.Tensor
    master_aux: torch.Tensor


class TASNExtras(NamedTuple):
    """What pictures are drawn from: maps at the attention net's resolution, sampled images."""

    structure_map: torch.Tensor  # (n, h, w), summed maps (squared after upsampling)
    detail_map: torch.Tensor  # (n, h, w), one channel in training, the sum in evaluation
    structure_images: torch.Tensor  # (n, 3, out, out)
    detail_images: torch.Tensor


class BaselineOutput(NamedTuple):
    logits: torch.Tensor


class SharedBackbone(nn.Module):
    """One ResNet, classifier removed: pooled features for part and master alike."""

    def __init__(self, arch: str, pretrained: str, zero_init_residual: bool = False,
                 weights: str = "IMAGENET1K_V1"):
        super().__init__()
        net = build_resnet(arch, pretrained, zero_init_residual, weights)
        self.features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def per_peak(maps: torch.Tensor) -> torch.Tensor:
    """Each (n, h, w) map over its own peak. The sampler normalises the powered profiles, so this
    moves no sample; it keeps a high power finite (peaks of 10^3 overflow fp32 at the 13th power,
    and an overflowed map is sampled as a plain resize). NaN and Inf stay non-finite."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak.view(-1, 1, 1)


class TASN(nn.Module):
    """Attention net -> trilinear attention -> two attention samplers -> one shared backbone."""

    heads = TASNOutput._fields
    primary_head = "master_aux"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        att_backbone: str = "resnet18",
        att_head_channels: int = 512,
        att_size: int = 224,
        att_stride: int = 8,
        out_size: int = 224,
        dense: float = 4.0,
        iters: int = 5,
        structure_power: float = 2.0,
        detail_power: float = 1.0,
        pretrained: str = "none",
        att_pretrained: str = "none",
        zero_init_residual: bool = False,
        pretrained_weights: str = "IMAGENET1K_V1",
    ):
        super().__init__()
        self.num_classes = num_classes
        self.att_size, self.out_size, self.dense, self.iters = att_size, out_size, dense, iters
        self.structure_power, self.detail_power = structure_power, detail_power
        self.attention_net = AttentionNet(num_classes, att_backbone, att_head_channels, att_pretrained,
                                          zero_init_residual, att_stride)
        self.backbone = SharedBackbone(backbone, pretrained, zero_init_residual, pretrained_weights)
        f = self.backbone.features
        self.fc_part = nn.Linear(f, num_classes)
        self.fc_master = nn.Linear(f, num_classes)
        self.fc = nn.Linear(f, num_classes)
        authors_init(self.fc_part, self.fc_master, self.fc)
        # Training images whose attention maps the sampler could not use (NaN/Inf: it resized them
        # plainly), since the last `take_nonfinite_attention()`; a device tensor, so counting never syncs.
        self.nonfinite_attention: torch.Tensor | None = None

    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention logits and the c trilinear attention maps (detached: no sampling gradient)."""
        # align corners, as the authors' MXNet BilinearResize2D (and TASN's sampler) do
        small = F.interpolate(x, size=(self.att_size, self.att_size), mode="bilinear", align_corners=True)
        logits, feats = self.attention_net(small)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            maps = trilinear_attention(feats.detach().float())  # fp32 even under autocast
        return logits, maps

    def select_maps(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Structure map = sum of all channels; detail map = one random channel per sample in
        training, the (deterministic) sum in evaluation."""
        structure = maps.sum(dim=1)
        if self.training:
            pick = torch.randint(maps.shape[1], (maps.shape[0],), device=maps.device)
            detail = maps[torch.arange(maps.shape[0], device=maps.device), pick]
        else:
            detail = structure
        return structure, detail

    def forward(self, x: torch.Tensor, return_extras: bool = False):
        """x: (n, 3, S, S) normalised images. Returns TASNOutput, or (TASNOutput, TASNExtras)."""
        n = x.shape[0]
        att_logits, maps = self.attention_maps(x)
        structure_map, detail_map = self.select_maps(maps)
        sampled = per_peak(structure_map), per_peak(detail_map)
        if self.training:
            self._count_nonfinite(*sampled, x.shape[-1])
        sampler: dict[str, Any] = dict(out_size=self.out_size, dense=self.dense, iters=self.iters)
        # Powered after upsampling to S x S (the authors: structure squared, detail not); the sampler
        # powers the profiles, which is the same.
        structure = attention_sample(x, sampled[0], power=self.structure_power, **sampler)
        detail = attention_sample(x, sampled[1], power=self.detail_power, **sampler)
        feats = self.backbone(torch.cat([detail, structure], dim=0))
        part_feats, master_feats = feats[:n], feats[n:]
        shared = self.fc(feats)
        out = TASNOutput(
            attention=att_logits,
            part=self.fc_part(part_feats),
            master=self.fc_master(master_feats),
            part_aux=shared[:n],
            master_aux=shared[n:],
        )
        if return_extras:
            return out, TASNExtras(structure_map, detail_map, structure, detail)
        return out

    def _count_nonfinite(self, structure_map: torch.Tensor, detail_map: torch.Tensor, size: int) -> None:
        bad = (nonfinite_maps(structure_map, size, self.structure_power)
               | nonfinite_maps(detail_map, size, self.detail_power)).sum()
        self.nonfinite_attention = bad if self.nonfinite_attention is None else self.nonfinite_attention + bad

    def take_nonfinite_attention(self) -> int:
        """How many training images since the last call had an attention map with NaN or Inf (the sampler
        gave them a plain resize instead: for them TASN was silently the baseline); resets the count."""
        count, self.nonfinite_attention = self.nonfinite_attention, None
        return 0 if count is None else int(count)


class Baseline(nn.Module):
    """The plain backbone on the image resized to `out_size` (the resolution TASN's backbone
    sees), i.e. TASN's sampler with uniform attention: the side-by-side reference."""

    heads = BaselineOutput._fields
    primary_head = "logits"

    def __init__(self, num_classes: int, backbone: str = "resnet50", out_size: int = 224, pretrained: str = "none",
                 zero_init_residual: bool = False, pretrained_weights: str = "IMAGENET1K_V1"):
        super().__init__()
        self.num_classes = num_classes
        self.out_size = out_size
        self.backbone = SharedBackbone(backbone, pretrained, zero_init_residual, pretrained_weights)
        self.fc = nn.Linear(self.backbone.features, num_classes)
        authors_init(self.fc)

    def forward(self, x: torch.Tensor, return_extras: bool = False):
        small = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=True)
        out = BaselineOutput(self.fc(self.backbone(small)))
        return (out, None) if return_extras else out


Network = TASN | Baseline  # what build_model returns: `heads`, `primary_head`, forward(x, return_extras)


def build_model(cfg: ModelConfig, num_classes: int | None = None) -> Network:
    """TASN or the baseline from a `tasn.config.ModelConfig`."""
    classes = num_classes or cfg.num_classes
    if not classes or classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {classes}")
    if cfg.kind == "baseline":
        return Baseline(classes, cfg.backbone, cfg.out_size, cfg.pretrained, cfg.zero_init_residual,
                        cfg.pretrained_weights)
    if cfg.kind != "tasn":
        raise ValueError(f"model.kind must be tasn or baseline, got {cfg.kind!r}")
    return TASN(
        classes,
        backbone=cfg.backbone,
        att_backbone=cfg.att_backbone,
        att_head_channels=cfg.att_head_channels,
        att_size=cfg.att_size,
        att_stride=cfg.att_stride,
        out_size=cfg.out_size,
        dense=cfg.dense,
        iters=cfg.iters,
        structure_power=cfg.structure_power,
        detail_power=cfg.detail_power,
        pretrained=cfg.pretrained,
        att_pretrained=cfg.att_pretrained,
        zero_init_residual=cfg.zero_init_residual,
        pretrained_weights=cfg.pretrained_weights,
    )
