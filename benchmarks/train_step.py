"""Images/s of the TASN train step against its "backbone bound", measured in the same run.

The bound is what the step would cost if attention and sampling were free: the attention net
fwd+bwd at `att_size` on n images plus the shared backbone fwd+bwd on the 2n sampled images at
`out_size` (plus the optimizer step). Target (issue 5): the TASN step at >= 85% of the bound. A
plain backbone train step on n images at `out_size` is printed too, as an anchor against published
numbers (H100, torch 2.11, ResNet-50 at 224, batch 96, bf16, channels-last: 3,618 img/s).

CUDA: the authors' network (ResNet-50 shared, ResNet-18 attention, 512 -> 224 / 224), batch 96,
bf16 autocast, channels-last, random init. CPU: a tiny configuration (slim backbones, 96 px,
batch 8) so the script runs anywhere in seconds; its numbers only show the ratio.

Needs torch and torchvision only. `PYTHONPATH=. python benchmarks/train_step.py [--out FILE]`
prints a markdown table (and writes it to FILE).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasn.config import LossConfig, ModelConfig
from tasn.model import TASN, build_loss
from tasn.model.network import SharedBackbone
from tasn.model.sampler import _resolve_impl


@dataclass(frozen=True)
class Shape:
    backbone: str
    att_backbone: str
    att_head_channels: int
    input_size: int
    att_size: int
    out_size: int
    batch: int


GPU = Shape(backbone="resnet50", att_backbone="resnet18", att_head_channels=512, input_size=512,
            att_size=224, out_size=224, batch=96)
CPU = Shape(backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=32, input_size=96,
            att_size=64, out_size=48, batch=8)


def timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 96 on CUDA, 8 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = GPU if cuda else CPU
    n = args.batch or shape.batch
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    iters = args.iters if args.iters is not None else (20 if cuda else 3)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    classes = 200

    model = TASN(classes, backbone=shape.backbone, att_backbone=shape.att_backbone,
                 att_head_channels=shape.att_head_channels, att_size=shape.att_size,
                 out_size=shape.out_size).to(device).to(memory_format=fmt).train()
    loss_fn = build_loss(ModelConfig(kind="tasn"), LossConfig())  # the authors' loss weights and temperature
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(n, 3, shape.input_size, shape.input_size, device=device).to(memory_format=fmt)
    y = torch.randint(classes, (n,), device=device)
    x_att = torch.randn(n, 3, shape.att_size, shape.att_size, device=device).to(memory_format=fmt)
    x_out = torch.randn(2 * n, 3, shape.out_size, shape.out_size, device=device).to(memory_format=fmt)
    y2 = torch.cat([y, y])

    def tasn_step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss, _ = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    def bound_step():
        """The same modules, minus resize, trilinear attention and the two samplers."""
        opt.zero_grad(set_to_none=True)
        with amp:
            att_logits, _ = model.attention_net(x_att)
            feats = model.backbone(x_out)
            loss = F.cross_entropy(att_logits.float(), y) + F.cross_entropy(model.fc(feats).float(), y2)
        loss.backward()
        opt.step()

    plain = SharedBackbone(shape.backbone, "none").to(device).to(memory_format=fmt).train()
    head = torch.nn.Linear(plain.features, classes).to(device)
    plain_opt = torch.optim.SGD([*plain.parameters(), *head.parameters()], lr=1e-3, momentum=0.9)
    x_plain = x_out[:n]

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        with amp:
            loss = F.cross_entropy(head(plain(x_plain)).float(), y)
        loss.backward()
        plain_opt.step()

    t_tasn = timed(tasn_step, device, warmup, iters)
    t_bound = timed(bound_step, device, warmup, iters)
    t_plain = timed(plain_step, device, warmup, iters)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    sampler = _resolve_impl("auto", x)
    config = (f"{shape.backbone} shared + {shape.att_backbone} attention, input {shape.input_size}, "
              f"att {shape.att_size}, out {shape.out_size}, batch {n}, "
              f"{'bf16 autocast, channels-last' if cuda else 'fp32'}, sampler: {sampler}")
    rows = [
        ("TASN train step", n / t_tasn, t_tasn),
        ("backbone bound (att net on n + shared backbone on 2n)", n / t_bound, t_bound),
        (f"plain {shape.backbone} train step at {shape.out_size} (anchor)", n / t_plain, t_plain),
    ]
    lines = [
        f"### Train step — {name}, torch {torch.__version__}",
        "",
        f"{config}; median of {iters} steps after {warmup} warm-up.",
        "",
        "| what | images/s | ms/step |",
        "|---|---:|---:|",
        *[f"| {what} | {ips:,.1f} | {1000 * t:.1f} |" for what, ips, t in rows],
        f"| **TASN / bound** | **{t_bound / t_tasn:.1%}** | target >= 85% |",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
