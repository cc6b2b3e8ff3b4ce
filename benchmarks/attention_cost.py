"""What reading the input at a size and output stride costs the CPU demo's TASN training step.

`model.att_size` and `model.att_stride` decide what the attention net can see (a fine texture
survives no resize to a third) and how much of the step it takes; this times the demo's network
(slim ResNet-18s, input 168, out 56, 64 head channels, batch 32, float32) at each setting: the
whole train step (forward, loss, backward, SGD update) and the attention net's share of it (its
forward and backward alone, on the resized images). Random images and labels; the median of
`--iters` steps after two of warm-up. And whether coarser maps still zoom: how many of the 56
output columns the sampler gives a 24 px part (a 2 % part at 168) when the map has one hot cell
over it, for each map size (a plain resize gives it 8). docs/training.md ("Beyond the embedded
set") reads both.

`PYTHONPATH=. python benchmarks/attention_cost.py [--threads 1] [--iters 6]`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasn.model import TASN, TASNLoss
from tasn.model.sampler import attention_sample

SETTINGS = ((56, 8), (112, 8), (168, 8), (112, 16), (168, 16))  # (att_size, att_stride)
INPUT, OUT, BATCH, CLASSES = 168, 56, 32, 10


def map_side(att_size: int, att_stride: int) -> int:
    """The side of the attention maps: the trunk's strided convolutions round up."""
    return -(-att_size // att_stride)


def median_seconds(step: Callable[[], None], iters: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(att_size: int, att_stride: int, iters: int) -> tuple[float, float]:
    """(seconds per train step, seconds of the attention net's forward and backward)."""
    torch.manual_seed(0)
    model = TASN(CLASSES, backbone="resnet18-slim", att_backbone="resnet18-slim", att_head_channels=64,
                 att_size=att_size, att_stride=att_stride, out_size=OUT).train()
    loss_fn, opt = TASNLoss(), torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(BATCH, 3, INPUT, INPUT), torch.randint(CLASSES, (BATCH,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y)[0].backward()
        opt.step()

    def attention_only() -> None:
        small = F.interpolate(x, size=(att_size, att_size), mode="bilinear", align_corners=True)
        F.cross_entropy(model.attention_net(small)[0], y).backward()
        opt.zero_grad(set_to_none=True)

    return median_seconds(step, iters), median_seconds(attention_only, iters)


def part_columns(cells: int, power: float, part: int = 24) -> int:
    """Output columns whose source lies on the central `part` px of the input, for a map of
    `cells` x `cells` with its one hot cell at the centre (structure image: power 2; detail: 1)."""
    ramp = torch.arange(INPUT, dtype=torch.float32).expand(1, 3, INPUT, INPUT).contiguous()  # pixel = its x
    hot = torch.zeros(1, cells, cells)
    hot[0, cells // 2, cells // 2] = 1.0
    row = attention_sample(ramp, hot, out_size=OUT, dense=4.0, iters=5, power=power)[0, 0, OUT // 2]
    centre = (INPUT - 1) / 2
    return int(((row - centre).abs() <= part / 2).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the details suite)")
    ap.add_argument("--iters", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}: input {INPUT}, out {OUT}, "
          f"batch {BATCH}, float32\n")
    print("| att_size | att_stride | maps | train step, s | the attention net's fwd+bwd, s |")
    print("|---:|---:|---|---:|---:|")
    for size, stride in SETTINGS:
        step, att = measure(size, stride, args.iters)
        side = map_side(size, stride)
        print(f"| {size} | {stride} | {side} x {side} | {step:.3f} | {att:.3f} |", flush=True)
    print("\n| maps | columns of 56 on a 24 px part: structure image | detail image |\n|---|---:|---:|")
    for side in sorted({map_side(size, stride) for size, stride in SETTINGS}):
        print(f"| {side} x {side} | {part_columns(side, 2.0)} | {part_columns(side, 1.0)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
