"""Measure the rounding error of every float32 sampler path against float64: the op tests' tolerances.

tests/fixtures/sampler_bounds.py states the error model: a float32 path's coordinate may be off by
`2 / (S - 1) * K * eps * out / slope_min + 4 eps`, K a small constant. This script measures, on many
attention maps (fixed seeds), the K each path needs, and the gather's error against its bound
(as a fraction of it):

- `cpu kernel`: the op's CPU kernels (tasn/ops/csrc/ops.cpp), float32;
- `cpu kernel, upsampled map +-1 ulp`: the same on the map upsampled in float64, rounded to float32
  and moved by one ulp up or down at random: what contracting the upsampling into fused
  multiply-adds (the CUDA build) does to it, emulated on a CPU;
- `reference float32`: tasn.model.sampler on float32 maps (torch's CPU sum and cumsum accumulate in
  float64);
- `reference, float32 accumulation`: the same with the sums and the cumulative sum accumulated in
  float32 (an emulation of ATen's CUDA reductions, which the GPU reference uses);
- on CUDA also `cuda kernel` and `reference float32 on cuda`.

    PYTHONPATH=. python benchmarks/tolerances.py [--draws 30] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout; the error model lives with the tests

from fixtures import sampler_bounds as sb
from tasn import ops
from tasn.model import sampler

# (S, out, h, w, power, map kind): TASN's structure and details maps at out 224 and 336, and the
# shapes of tests/test_ops.py.
SHAPES = [
    (512, 224, 28, 28, 2.0, "peaks"), (512, 224, 28, 28, 2.0, "blobs"), (512, 224, 28, 28, 1.0, "random"),
    (512, 336, 28, 28, 2.0, "peaks"), (512, 336, 28, 28, 1.0, "blobs"),
    (64, 32, 7, 5, 1.0, "blobs"), (100, 100, 28, 28, 2.0, "random"), (40, 30, 40, 40, 2.0, "random"),
    (33, 60, 60, 3, 1.0, "random"), (37, 20, 7, 7, 2.0, "blobs"), (1000, 333, 13, 29, 2.0, "blobs"),
    (1024, 1024, 28, 28, 1.0, "random"),
]
DENSE, ITERS = 4.0, 5


def maps(kind: str, n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """`random`: rand**4; `blobs`: wide gaussians on a floor of 0.01 (the op tests' maps); `peaks`:
    narrow gaussians (sigma 3 cells) with no floor, as benchmarks/sampler.py's structure maps."""
    if kind == "random":
        return torch.rand(n, h, w, generator=g) ** 4
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.rand(n, 1, 1, generator=g) * h, torch.rand(n, 1, 1, generator=g) * w
    r2 = (ys - cy) ** 2 + (xs - cx) ** 2
    if kind == "blobs":
        return 0.01 + torch.exp(-r2 / (2 * (0.1 * max(h, w) + 0.5) ** 2))
    return torch.exp(-r2 / (2 * 3.0**2))


def float32_accumulation_reference(att: torch.Tensor, size: int, out: int, power: float) -> torch.Tensor:
    """The reference's definition with every sum and the cumulative sum accumulated in float32."""
    a = att.float().unsqueeze(1)
    if a.shape[-2:] != (size, size):
        a = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=True)
    up = a.squeeze(1).clamp_min(0).numpy()
    coords = []
    profiles = [up.max(axis=2) ** np.float32(power), up.max(axis=1) ** np.float32(power)]
    for i, p in enumerate(profiles):
        total = p.sum(axis=1, keepdims=True, dtype=np.float32)
        profiles[i] = np.where(np.isfinite(total) & (total > 0), p / total, np.float32(1.0 / size)).astype(np.float32)
    d = [p * np.float32(out) for p in profiles]
    cap = np.float32(DENSE * out / size)
    for t in range(ITERS):
        m = np.minimum(d[0].max(axis=1, keepdims=True), d[1].max(axis=1, keepdims=True))
        if t == 0:
            m = np.minimum(m, cap)
        for i in range(2):
            d[i] = np.minimum(d[i], m)
            d[i] = d[i] + (np.float32(out) - d[i].sum(axis=1, keepdims=True, dtype=np.float32)) / np.float32(size)
    for di in d:
        c = np.zeros_like(di)
        c[:, 1:] = np.cumsum((di[:, :-1] + di[:, 1:]) * np.float32(0.5), axis=1, dtype=np.float32)
        coords.append(_invert(torch.from_numpy(c), out))
    return torch.stack(coords)


def _invert(c: torch.Tensor, out: int) -> torch.Tensor:
    """Step 5 on a given cumulative density (float32), as the reference does it."""
    size = c.shape[1]
    u = (torch.arange(out, dtype=c.dtype) / (out - 1)).unsqueeze(0) * c[:, -1:]
    k = torch.searchsorted(c, u.contiguous()).clamp(1, size - 1)
    lo, hi = c.gather(1, k - 1), c.gather(1, k)
    step = hi - lo
    p = (k - 1).to(c.dtype) + (u - lo) / torch.where(step > 0, step, torch.ones_like(step))
    return 2.0 * torch.where(u > 0, p, torch.zeros_like(p)) / (size - 1) - 1.0


def upsampled_off_by_one_ulp(att: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """The map upsampled to S x S in float64, rounded to float32, each value one ulp up or down."""
    up = F.interpolate(att.double().unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True)
    up = up.squeeze(1).float()
    step = torch.randint(0, 2, up.shape, generator=g).bool()
    return torch.where(step, torch.nextafter(up, torch.tensor(np.inf)), torch.nextafter(up, torch.tensor(-np.inf)))


def measure(draws: int, n: int) -> tuple[list[dict], dict]:
    cpu_op = ops.load()
    cuda = torch.cuda.is_available() and ops.available()
    if torch.cuda.is_available() and not cuda:
        print(f"cuda kernel: NOT MEASURED: {ops.unavailable_reason()}", flush=True)
    rows: list[dict] = []
    worst: dict[str, float] = {}
    for shape in SHAPES:
        size, out, h, w, power, kind = shape
        need: dict[str, float] = {}
        gather_frac = 0.0
        for seed in range(draws):
            g = torch.Generator().manual_seed(seed)
            att = maps(kind, n, h, w, g)
            ref, slopes = sb.float64_coordinates(att, size, out, DENSE, ITERS, power)
            paths = {"reference float32": torch.stack(sampler.sampler_coordinates(att, size, out, DENSE, ITERS, power)),
                     "reference, float32 accumulation": float32_accumulation_reference(att, size, out, power)}
            if cpu_op:
                paths["cpu kernel"] = torch.ops.tasn.sampler_coordinates(att, size, out, DENSE, ITERS, power)
                if (h, w) != (size, size):
                    up = upsampled_off_by_one_ulp(att, size, g)
                    # the reference of the perturbed path: the unrounded float64 upsampled map
                    paths["cpu kernel, upsampled map +-1 ulp"] = torch.ops.tasn.sampler_coordinates(
                        up, size, out, DENSE, ITERS, power)
                images = torch.rand(n, 3, size, size, generator=g) if size <= 512 else None
                if images is not None:
                    coords = paths["cpu kernel"]
                    err = float((torch.ops.tasn.bilinear_gather(images, coords).double()
                                 - sb.grid_sample64(images, coords)).abs().max())
                    gather_frac = max(gather_frac, err / sb.gather_bound(images, torch.float32))
            if cuda:
                a = att.cuda()
                paths["cuda kernel"] = torch.ops.tasn.sampler_coordinates(a, size, out, DENSE, ITERS, power)
                paths["reference float32 on cuda"] = torch.stack(
                    sampler.sampler_coordinates(a, size, out, DENSE, ITERS, power))
            for name, coords in paths.items():
                need[name] = max(need.get(name, 0.0), sb.needed_k(coords, ref, slopes, size, out))
        rows.append(dict(shape=shape, need=need, gather_frac=gather_frac))
        for name, k in need.items():
            worst[name] = max(worst.get(name, 0.0), k)
        print(f"S {size} out {out} map {h}x{w} {kind} power {power:g}: "
              + ", ".join(f"{k_}: K {v:.2f}" for k_, v in need.items())
              + (f"; gather error {gather_frac:.2%} of its bound" if gather_frac else ""), flush=True)
    return rows, worst


def markdown(rows: list[dict], worst: dict, draws: int, n: int, seconds: float) -> str:
    names = list(worst)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"{device}, torch {torch.__version__}, {draws} draws x {n} maps per shape "
             f"({draws * n * len(rows)} maps), dense {DENSE:g}, iters {ITERS}, seeds 0..{draws - 1}; "
             f"{seconds:.0f} s ({datetime.date.today().isoformat()})", "",
             "| S -> out, map, power | " + " | ".join(f"K: {k}" for k in names) + " | gather error / bound |",
             "|---|" + "---:|" * (len(names) + 1)]
    for r in rows:
        size, out, h, w, power, kind = r["shape"]
        ks = " | ".join(f"{r['need'][k]:.2f}" if k in r["need"] else "" for k in names)
        frac = f"{r['gather_frac']:.1%}" if r["gather_frac"] else ""
        lines.append(f"| {size} -> {out}, {h}x{w} {kind}, {power:g} | {ks} | {frac} |")
    lines.append("| **largest** | " + " | ".join(f"**{worst[k]:.2f}**" for k in names) + " | |")
    lines.append("")
    lines.append(f"The op tests allow K = {sb.COORD_K:g} (tests/fixtures/sampler_bounds.py).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=30, help="seeds per shape")
    p.add_argument("--n", type=int, default=16, help="maps per draw")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    os.environ.setdefault("TASN_SAMPLER", "auto")
    t0 = time.time()
    rows, worst = measure(args.draws, args.n)
    text = markdown(rows, worst, args.draws, args.n, time.time() - t0)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if torch.cuda.is_available() and not ops.available():
        print(f"error: the CUDA kernel was not measured: {ops.unavailable_reason()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
