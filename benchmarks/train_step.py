"""Images/s of the TASN train step against its "backbone bound", measured in the same run.

The bound is what the step would cost if attention and sampling were free: the attention net
fwd+bwd at `att_size` on n images plus the shared backbone fwd+bwd on the 2n sampled images at
`out_size` (plus the optimizer step). Target (issue 5): the TASN step at >= 85% of the bound. A
plain backbone train step on n images at `out_size` is printed too, as an anchor against published
numbers (H100, torch 2.11, ResNet-50 at 224, batch 96, bf16, channels-last: 3,618 img/s).

CUDA: the authors' network (ResNet-50 shared, ResNet-18 attention, 512 -> 224 / 224), batch 96,
channels-last, random init, in bf16 autocast (`--precision bf16`, the issue-5 target) or float32
(`--precision fp32`: the `cub` profiles' precision, the authors'). On CUDA the TASN step must run
the fused sampler: when it is not available the script refuses (exit 1, the reason printed) rather
than report the reference's step as the op's, unless `--sampler reference` asks for that. CPU: a
tiny configuration (slim backbones, 96 px, batch 8) so the script runs anywhere in seconds; its
numbers only show the ratio. Each measurement is printed (and the table so far written to `--out`)
as soon as it is taken.

Needs torch and torchvision only (no tasn.config: GPU hosts may lack pyyaml).
`PYTHONPATH=. python benchmarks/train_step.py [--out FILE]`
prints a markdown table (and writes it to FILE).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasn import ops
from tasn.model import TASN, TASNLoss
from tasn.model.network import SharedBackbone


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
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="CUDA: autocast dtype")
    ap.add_argument("--sampler", choices=("fused", "reference"), default="fused",
                    help="CUDA: the sampler of the TASN step (default: the fused op, refused if unavailable)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    shape = GPU if cuda else CPU
    n = args.batch or shape.batch
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    iters = args.iters if args.iters is not None else (20 if cuda else 3)
    sampler = args.sampler if cuda else "reference"
    if cuda and sampler == "fused" and not ops.available():
        print(f"error: the fused sampler is not available, so the TASN step would time the reference: "
              f"{ops.unavailable_reason()} (--sampler reference measures that, labelled)", file=sys.stderr)
        return 1
    os.environ["TASN_SAMPLER"] = sampler
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    bf16 = cuda and args.precision == "bf16"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    classes = 200

    model = TASN(classes, backbone=shape.backbone, att_backbone=shape.att_backbone,
                 att_head_channels=shape.att_head_channels, att_size=shape.att_size,
                 out_size=shape.out_size).to(device).to(memory_format=fmt).train()
    loss_fn = TASNLoss()  # the authors' loss weights and temperature
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

    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    precision = ("bf16 autocast" if bf16 else "fp32") + (", channels-last" if cuda else "")
    config = (f"{shape.backbone} shared + {shape.att_backbone} attention, input {shape.input_size}, "
              f"att {shape.att_size}, out {shape.out_size}, batch {n}, {precision}, sampler: {sampler}")
    steps = [("TASN train step", tasn_step),
             ("backbone bound (att net on n + shared backbone on 2n)", bound_step),
             (f"plain {shape.backbone} train step at {shape.out_size} (anchor)", plain_step)]
    rows: list[tuple[str, float, float]] = []
    for what, step in steps:
        t = timed(step, device, warmup, iters)
        rows.append((what, n / t, t))
        print(f"{what}: {n / t:,.1f} images/s, {1000 * t:.1f} ms/step", flush=True)
        write_table(args.out, name, config, iters, warmup, rows)
    print(write_table(args.out, name, config, iters, warmup, rows))
    return 0


def write_table(path: str | None, name: str, config: str, iters: int, warmup: int,
                rows: list[tuple[str, float, float]]) -> str:
    """The markdown table of the rows measured so far (the ratio once both are there), also to `path`."""
    lines = [
        f"### Train step — {name}, torch {torch.__version__}",
        "",
        f"{config}; median of {iters} steps after {warmup} warm-up.",
        "",
        "| what | images/s | ms/step |",
        "|---|---:|---:|",
        *[f"| {what} | {ips:,.1f} | {1000 * t:.1f} |" for what, ips, t in rows],
    ]
    if len(rows) >= 2:
        lines.append(f"| **TASN / bound** | **{rows[1][2] / rows[0][2]:.1%}** | target >= 85% |")
    table = "\n".join(lines) + "\n"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
