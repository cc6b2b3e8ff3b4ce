"""How the network runs while training: determinism, precision, memory format and BatchNorm.

Precision: bf16 autocast (fp16 + GradScaler on GPUs without bf16) and channels-last on CUDA only;
CPU runs stay fp32, so a laptop run and a test are exact. BatchNorm (`train.batchnorm`): `local`
keeps per-process batch statistics, `sync` converts to SyncBatchNorm (CUDA, many processes), and
`frozen` keeps BatchNorm on its running statistics (what makes 1 x 8 and 2 x 4 images equivalent).
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from typing import cast

import torch
import torch.nn as nn

from tasn.config import TrainConfig
from tasn.distributed import Context
from tasn.errors import TASNError
from tasn.model.network import Network


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def precision(amp: bool, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """bf16 autocast on CUDA (fp16 + loss scaling where bf16 is missing); fp32 elsewhere."""
    if not (amp and device.type == "cuda"):
        return None, torch.amp.GradScaler("cpu", enabled=False)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)
    return torch.float16, torch.amp.GradScaler("cuda", enabled=True)


def autocast(amp_dtype: torch.dtype | None, device: torch.device) -> AbstractContextManager[object]:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" and cfg.channels_last


def place(model: nn.Module, cfg: TrainConfig, ctx: Context) -> nn.Module:
    """The model with its BatchNorm mode applied, on the device, channels-last where it pays."""
    if cfg.batchnorm == "sync":
        if ctx.device.type != "cuda":
            raise TASNError("train.batchnorm: sync needs CUDA; use local or frozen on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    if uses_channels_last(cfg, ctx.device):
        model.to(memory_format=torch.channels_last)
    return model


def set_train_mode(model: nn.Module, batchnorm: str) -> None:
    """model.train(), except that `frozen` keeps BatchNorm on its running statistics."""
    model.train()
    if batchnorm == "frozen":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def unwrap(model: nn.Module) -> Network:
    """The network inside a DistributedDataParallel wrapper (or the model itself)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return cast(Network, net)
