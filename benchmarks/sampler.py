"""Time the attention sampler: the PyTorch reference against the fused op, on the same inputs.

On CUDA (defaults n = 96, 3x512x512 -> 224, float32 and bfloat16, TASN's structure map: 28x28
blobs, power 2): the reference (tasn.model.sampler, composed ops), optionally the reference under
torch.compile (`--compiled`), the fused op and its two kernels alone, forward and forward+backward;
CUDA events, median of `--runs`. The bandwidth floor is one read of the images plus one write of the
output at the measured device-to-device copy bandwidth; "x floor" is time / floor.
On CPU only the reference runs (n = 8 by default): there is no fused CPU path worth timing
(`--cpu-kernels` times the op's CPU kernels anyway, which runs every path of this script without a GPU).
When the fused op is not available on a CUDA machine (built without the CUDA toolkit, say), the
reference rows are still measured, every fused row is refused with the reason, and the script exits 1:
a figure of the reference is never reported as the op's. Each row is printed, and written to `--json`,
as soon as it is measured, so a run cut off keeps what it measured.

    python benchmarks/sampler.py                          # prints a markdown table
    python benchmarks/sampler.py --append benchmarks/RESULTS.md --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tasn import ops
from tasn.io import atomic_write_text
from tasn.model.sampler import reference_attention_sample

MARKER = "<!-- sampler-results: benchmarks/sampler.py --append inserts below -->"


def structure_maps(n: int, h: int, w: int, device) -> torch.Tensor:
    """Gaussian blobs, the shape of TASN's attention maps (fixed seed: same inputs for every impl)."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.rand(n, 1, 1, generator=g) * h, torch.rand(n, 1, 1, generator=g) * w
    return torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 3.0**2)).to(device)


def time_cuda(fn, runs: int, warmup: int = 5) -> float:
    """Median milliseconds of `fn()` over `runs`, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, runs: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), runs)
    return 2 * nbytes / (ms * 1e-3)


def bench(args, rows: list[dict], device: torch.device) -> str | None:
    """Append the rows to `rows` as they are measured; returns why the fused op was refused, if it was.

    On CUDA: the reference (and under torch.compile), the fused op and its two kernels, forward for
    each dtype, forward+backward in float32. On CPU only the reference, unless `--cpu-kernels`: the
    same table with the op's CPU kernels (slow, serial per image; they exist to test the arithmetic,
    and this runs the script's every path without a GPU)."""
    cuda = device.type == "cuda"
    if cuda:
        refused = None if ops.available() else ops.unavailable_reason()
    elif args.cpu_kernels:
        refused = None if ops.load() else f"the library could not be built or loaded: {ops._load_error}"
    else:
        refused = "not timed on CPU (--cpu-kernels times the op's CPU kernels)"
    bw = copy_bandwidth() if cuda else None
    timer = time_cuda if cuda else time_cpu
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"

    def add(**row):
        rows.append(dict(row, device=name, copy_bandwidth_gbs=bw / 1e9 if bw else None))
        report(rows, args)

    att = structure_maps(args.n, 28, 28, device)
    call = (args.out, args.dense, args.iters, args.power)
    for dtype in args.dtypes if cuda or args.cpu_kernels else [torch.float32]:
        images = torch.rand(args.n, 3, args.size, args.size, device=device).to(dtype)
        floor_ms = (images.numel() + args.n * 3 * args.out**2) * images.element_size() / bw * 1e3 if bw else None
        dtype_name = str(dtype).replace("torch.", "")
        impls = {"reference (composed ops)": lambda: reference_attention_sample(images, att, *call)}
        if args.compiled:
            compiled = torch.compile(reference_attention_sample)
            impls["reference + torch.compile"] = lambda: compiled(images, att, *call)
        diff = None
        if refused is None:
            fused = lambda: torch.ops.tasn.attention_sample(images, att, *call)  # noqa: E731
            impls["fused op"] = fused
            coords = torch.ops.tasn.sampler_coordinates(att, args.size, *call)
            coords = coords.to(torch.float64 if dtype == torch.float64 else torch.float32)
            impls["fused: coordinates kernel"] = lambda: torch.ops.tasn.sampler_coordinates(att, args.size, *call)
            impls["fused: gather kernel"] = lambda: torch.ops.tasn.bilinear_gather(images, coords)
            diff = (fused().double() - reference_attention_sample(images, att, *call).double()).abs().max().item()
        ref_ms = None
        for impl, fn in impls.items():
            ms = timer(fn, args.runs)
            ref_ms = ref_ms or ms
            add(impl=impl, pass_="forward", dtype=dtype_name, ms=ms, speedup=ref_ms / ms, floor_ms=floor_ms,
                max_abs_diff=diff if impl == "fused op" else None)
        if refused is not None and (cuda or args.cpu_kernels):
            add(impl="fused op", pass_="forward", dtype=dtype_name, ms=None, speedup=None, floor_ms=None,
                max_abs_diff=None, refused=refused)
        if dtype == torch.float32 and (cuda or args.cpu_kernels):  # a training step runs the backward too
            weight = torch.rand(args.n, 3, args.out, args.out, device=device)
            ref_ms = None
            passes = [("reference (composed ops)", reference_attention_sample)]
            if refused is None:
                passes.append(("fused op", torch.ops.tasn.attention_sample))
            for impl, op in passes:
                x = images.clone().requires_grad_()

                def step(op=op, x=x):
                    x.grad = None
                    (op(x, att, *call) * weight).sum().backward()

                ms = timer(step, args.runs)
                ref_ms = ref_ms or ms
                add(impl=impl, pass_="forward+backward", dtype="float32", ms=ms, speedup=ref_ms / ms, floor_ms=None,
                    max_abs_diff=None)
    return refused if cuda or args.cpu_kernels else None


def report(rows: list[dict], args) -> None:
    """The newest row on stdout and every row so far in `--json`: a run cut off keeps what it measured."""
    r = rows[-1]
    what = f"NOT MEASURED: {r['refused']}" if r.get("refused") else f"{r['ms']:.3f} ms"
    print(f"{r['impl']}, {r['pass_']}, {r['dtype']}: {what}", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")


def table(rows: list[dict], args) -> str:
    dev = rows[0]["device"]
    bw = rows[0]["copy_bandwidth_gbs"]
    head = (f"{dev}, torch {torch.__version__}, n = {args.n}, 3x{args.size}x{args.size} -> {args.out}, "
            f"dense {args.dense}, iters {args.iters}, power {args.power}, median of {args.runs}"
            + (f"; copy bandwidth {bw:.0f} GB/s" if bw else "")
            + f" ({datetime.date.today().isoformat()})")
    lines = [head, "", "| impl | pass | dtype | ms (median) | speed-up vs reference | x floor | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("refused"):
            lines.append(f"| {r['impl']} | {r['pass_']} | {r['dtype']} | not measured: {r['refused']} | | | |")
            continue
        floor = f"{r['ms'] / r['floor_ms']:.2f} (floor {r['floor_ms']:.3f} ms)" if r["floor_ms"] else ""
        diff = f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else ""
        lines.append(f"| {r['impl']} | {r['pass_']} | {r['dtype']} | {r['ms']:.3f} | {r['speedup']:.1f}x | {floor} "
                     f"| {diff} |")
    return "\n".join(lines) + "\n"


def append_results(path: Path, text: str) -> None:
    """Insert below the sampler marker of RESULTS.md (or at the end when the marker is missing)."""
    old = path.read_text() if path.exists() else ""
    new = old.replace(MARKER, MARKER + "\n\n" + text, 1) if MARKER in old else old + "\n" + text
    atomic_write_text(path, new)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=96 if cuda else 8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--out", type=int, default=224)
    p.add_argument("--dense", type=float, default=4.0)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--power", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=100 if cuda else 5)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated image dtypes (CUDA)")
    p.add_argument("--compiled", action="store_true", help="also time the reference under torch.compile")
    p.add_argument("--cpu-kernels", action="store_true", help="on CPU, also time the op's CPU kernels")
    p.add_argument("--append", type=Path, help="insert the table into this RESULTS.md")
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    args.dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.size < 2 or args.out < 2 or args.n < 1:
        p.error("--n >= 1, --size >= 2 and --out >= 2 are required")
    rows: list[dict] = []
    refused = bench(args, rows, torch.device("cuda" if cuda else "cpu"))
    text = table(rows, args)
    print(text)
    if args.append:
        append_results(args.append, text)
    if refused:
        print(f"error: the fused op was not measured: {refused}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
