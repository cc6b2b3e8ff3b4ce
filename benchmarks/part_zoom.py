"""How far TASN's sampler magnifies the part that decides the class, with a trained model's own maps.

A details set (`tasn data details`, the suite of benchmarks/details.py) knows where its part is:
`tasn.data.details.render` gives each canvas's part centre and radius. On the set's test canvases
this runs a trained TASN, samples the input with its structure map raised to each power asked, and
counts the output pixels that land on the part. Their share over the share a plain resize gives the
part is the zoom squared: the table prints the linear zoom (1 = a resize; `model.dense` caps it).
A texture of period p px at the input survives when p x zoom x out_size / input_size >= 2 output
pixels (the Nyquist rate): small8's 2.5 px at 168 -> 56 needs a zoom of 2.4.

The maps are detached from the sampling branches, so the power changes the zoom and not the maps:
one trained model answers for every power. Canvases are rendered, not read back from JPEG.

`PYTHONPATH=. python benchmarks/part_zoom.py MODEL_FILE --set small8 [--powers 1 2 4 6 8]`
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from details import SETS  # benchmarks/details.py: the suite's sets

from tasn.checkpoint import load_model
from tasn.data import details
from tasn.data.transforms import eval_transform
from tasn.model import TASN
from tasn.model.network import per_peak
from tasn.model.sampler import sampler_coordinates


def canvases(name: str, size: int, every: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, float, float]]]:
    """Every `every`-th test canvas of the set, as the eval crop at `size`, its label, and its part's
    centre and radius in crop pixels (the canvas is its own prepared image: side = preprocess size)."""
    cfg = SETS[name].cfg
    per_class = cfg.train_per_class + cfg.test_per_class
    crop, off = eval_transform(size), (cfg.side - size) / 2
    images, labels, parts = [], [], []
    for label, (kind, shape) in enumerate(details.class_table(cfg)):
        for k in range(cfg.train_per_class, per_class, every):
            canvas, box = details.render(cfg.seed, label * per_class + k, kind, shape, cfg)
            images.append(crop(Image.fromarray(canvas)))
            labels.append(label)
            radius = box.half / details.CARD if cfg.cue in ("card", "shape") else box.half
            parts.append((box.cx - off, box.cy - off, radius))
    return torch.stack(images), torch.tensor(labels), parts


def zooms(coords: tuple[torch.Tensor, torch.Tensor], parts: list[tuple[float, float, float]], size: int,
          out: int) -> list[float]:
    """Linear zoom on each image's part: sqrt(share of output pixels on the part / its share of the input)."""
    gy, gx = ((c + 1) * (size - 1) / 2 for c in coords)
    result = []
    for i, (cx, cy, r) in enumerate(parts):
        on = (gx[i][None, :] - cx) ** 2 + (gy[i][:, None] - cy) ** 2 <= r * r
        result.append(math.sqrt(on.double().mean().item() / (math.pi * r * r / size**2)))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a TASN model file (model.pt) trained on the set")
    ap.add_argument("--set", required=True, choices=sorted(SETS))
    ap.add_argument("--powers", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0, 8.0])
    ap.add_argument("--every", type=int, default=3, help="every n-th test canvas of each class")
    args = ap.parse_args(argv)
    model, meta = load_model(args.model)
    model = getattr(model, "model", model).eval()
    if not isinstance(model, TASN):
        ap.error(f"{args.model}: a baseline model file; the zoom is TASN's")
    size, out = meta["config"]["model"]["input_size"], model.out_size
    if SETS[args.set].cfg.side != meta["config"]["preprocess"]["size"]:
        ap.error("the set's canvas side must be the model's preprocess size (the suite's 192)")
    x, labels, parts = canvases(args.set, size, args.every)
    with torch.inference_mode():
        heads, extras = model(x, return_extras=True)
    att_top1 = (heads.attention.argmax(1) == labels).float().mean().item()
    print(f"{args.set}: {len(parts)} test canvases, input {size}, out {out}, dense {model.dense}; "
          f"the attention head's top-1 on them {att_top1:.3f}; the model samples at structure power "
          f"{model.structure_power}\n")
    print("| structure power | zoom on the part, median | 10th percentile | 90th percentile |")
    print("|---:|---:|---:|---:|")
    for p in args.powers:
        z = zooms(sampler_coordinates(per_peak(extras.structure_map), size, out, model.dense, model.iters, p),
                  parts, size, out)
        q = np.percentile(z, [10, 90])
        print(f"| {p:g} | {statistics.median(z):.2f} | {q[0]:.2f} | {q[1]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
