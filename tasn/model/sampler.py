"""The attention sampler: non-uniform resampling that magnifies attended rows and columns.

This is the vectorised PyTorch reference of "The sampler, exactly" in docs/method.md, and the CPU path.
For CUDA tensors `attention_sample` dispatches to the fused kernel in `tasn.ops` when it is
available (same definition, one launch for the whole batch); set `TASN_SAMPLER=reference` or pass
`impl="reference"` to force this code for comparison.

The grid is always computed in float32 (float64 for float64 images): a bfloat16 coordinate has
~3 significant digits, a whole pixel of error at S = 512.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from tasn import ops
from tasn.choices import SAMPLER_IMPLS

log = logging.getLogger(__name__)


def _check(images: torch.Tensor, attention: torch.Tensor, out_size: int, dense: float, iters: int):
    if images.dim() != 4:
        raise ValueError(f"images must be (n, C, S, S), got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"images must be square, got {images.shape[-2]}x{images.shape[-1]} "
            "(crop or pad to S x S before sampling)"
        )
    _check_attention(attention, images.shape[0], out_size, dense, iters)


def _check_attention(attention: torch.Tensor, n: int | None, out_size: int, dense: float, iters: int):
    if attention.dim() != 3:
        raise ValueError(f"attention must be (n, h, w), got shape {tuple(attention.shape)}")
    if n is not None and attention.shape[0] != n:
        raise ValueError(f"batch sizes differ: {n} images but {attention.shape[0]} attention maps")
    if attention.shape[1] < 1 or attention.shape[2] < 1:
        raise ValueError(f"attention maps must be at least 1x1, got {tuple(attention.shape[1:])}")
    if int(out_size) < 2:
        raise ValueError(f"out_size must be >= 2, got {out_size}")
    if not dense > 0:
        raise ValueError(f"dense must be > 0, got {dense}")
    if int(iters) < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")


def _profiles(attention: torch.Tensor, size: int, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2: upsample to S x S (align corners), clamp at 0, max along each axis, normalise.

    `power` raises the upsampled map to a power before the profiles are taken. Since x -> x**p is
    increasing on x >= 0 it commutes with max, so the profiles are powered instead of the S x S map.
    """
    a = attention.unsqueeze(1)
    if a.shape[-2:] != (size, size):
        a = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=True)
    a = a.squeeze(1).clamp_min(0)
    py = a.amax(dim=2)  # over columns: one value per row (y)
    px = a.amax(dim=1)  # over rows: one value per column (x)
    if power != 1.0:
        py, px = py.pow(power), px.pow(power)
    profiles = []
    for p in (py, px):
        total = p.sum(dim=1, keepdim=True)
        ok = torch.isfinite(total) & (total > 0)
        p = torch.where(ok, p / torch.where(ok, total, torch.ones_like(total)), 1.0 / size)
        profiles.append(p)
    return profiles[0], profiles[1]


def _densities(py, px, size: int, out_size: int, dense: float, iters: int):
    """Step 3: output pixels per input pixel, clipped (at most `dense` x a plain resize at t = 0)
    and the clipped mass spread back uniformly, `iters` times."""
    dy, dx = py * out_size, px * out_size
    cap = dense * out_size / size
    for t in range(iters):
        m = torch.minimum(dy.amax(dim=1, keepdim=True), dx.amax(dim=1, keepdim=True))
        if t == 0:
            m = m.clamp_max(cap)
        dy, dx = torch.minimum(dy, m), torch.minimum(dx, m)
        dy = dy + (out_size - dy.sum(dim=1, keepdim=True)) / size
        dx = dx + (out_size - dx.sum(dim=1, keepdim=True)) / size
    return dy, dx


def _coordinates(d: torch.Tensor, out_size: int) -> torch.Tensor:
    """Steps 4-5: trapezoid cumulative density, inverted at evenly spaced targets -> [-1, 1]."""
    n, size = d.shape
    c = torch.zeros_like(d)
    c[:, 1:] = torch.cumsum((d[:, :-1] + d[:, 1:]) * 0.5, dim=1)
    frac = torch.arange(out_size, device=d.device, dtype=d.dtype) / (out_size - 1)
    u = frac.unsqueeze(0) * c[:, -1:]  # (n, out)
    k = torch.searchsorted(c.contiguous(), u.contiguous(), right=False).clamp(1, size - 1)
    c_lo = c.gather(1, k - 1)
    c_hi = c.gather(1, k)
    step = c_hi - c_lo
    p = (k - 1).to(d.dtype) + (u - c_lo) / torch.where(step > 0, step, torch.ones_like(step))
    p = torch.where(u > 0, p, torch.zeros_like(p))
    return 2.0 * p / (size - 1) - 1.0


def sampler_coordinates(
    attention: torch.Tensor,
    size: int,
    out_size: int,
    dense: float = 4.0,
    iters: int = 5,
    power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 1-D coordinate vectors (gy over output rows, gx over output columns), each
    (n, out_size) in normalised [-1, 1] units. The sampler's grid is their outer product."""
    _check_attention(attention, None, out_size, dense, iters)
    if int(size) < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    dtype = torch.float64 if attention.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        py, px = _profiles(attention.detach().to(dtype), int(size), float(power))
        dy, dx = _densities(py, px, int(size), int(out_size), float(dense), int(iters))
        return _coordinates(dy, int(out_size)), _coordinates(dx, int(out_size))


def sampling_grid(
    attention: torch.Tensor,
    size: int,
    out_size: int,
    dense: float = 4.0,
    iters: int = 5,
    power: float = 1.0,
) -> torch.Tensor:
    """The (n, out, out, 2) grid for `grid_sample(..., align_corners=True)`: [..., 0] is x."""
    gy, gx = sampler_coordinates(attention, size, out_size, dense, iters, power)
    n, out = gy.shape
    return torch.stack((gx.unsqueeze(1).expand(n, out, out), gy.unsqueeze(2).expand(n, out, out)), dim=-1)


def reference_attention_sample(
    images: torch.Tensor,
    attention: torch.Tensor,
    out_size: int,
    dense: float = 4.0,
    iters: int = 5,
    power: float = 1.0,
) -> torch.Tensor:
    """The pure-PyTorch sampler. Gradient flows to `images` (bilinear), never to `attention`."""
    _check(images, attention, out_size, dense, iters)
    grid = sampling_grid(attention, images.shape[-1], out_size, dense, iters, power)
    compute = images if images.dtype == torch.float64 else images.float()
    grid = grid.to(compute.dtype)
    out = F.grid_sample(compute, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(images.dtype)


def nonfinite_maps(attention: torch.Tensor, size: int, power: float = 1.0) -> torch.Tensor:
    """(n,) bool: the maps the sampler cannot use and silently replaces by a plain resize (step 2's
    uniform profile): a NaN or infinite value, or values so large that the powered profile's sum
    could overflow. A diverged attention net shows up here first; TASN counts these maps in training.
    An all-zero map also gives a plain resize, by definition: it is not counted."""
    a = attention.detach().flatten(1)
    a = a if a.dtype == torch.float64 else a.float()
    peak = a.clamp_min(0).amax(dim=1)  # bilinear upsampling never exceeds it; NaN propagates
    return ~torch.isfinite(a).all(dim=1) | ~torch.isfinite(peak.pow(power) * size)


def _resolve_impl(impl: str, images: torch.Tensor) -> str:
    impl = impl if impl != "auto" else os.environ.get("TASN_SAMPLER", "auto")
    if impl not in SAMPLER_IMPLS:
        raise ValueError(f"sampler impl must be one of {', '.join(SAMPLER_IMPLS)}, got {impl!r}")
    if impl == "reference" or not images.is_cuda:
        if impl == "fused":
            raise ValueError("the fused sampler needs CUDA tensors; these are on " + str(images.device))
        return "reference"

    if impl == "fused":
        ops.load(required=True)
        return "fused"
    return "fused" if ops.available() else "reference"


def implementation(device: torch.device) -> str:
    """The sampler `attention_sample(impl="auto")` runs for tensors on `device`: "fused" or "reference"
    (what a training run records, so a GPU run that fell back to the reference says so)."""
    return _resolve_impl("auto", torch.empty(0, device=device))


def attention_sample(
    images: torch.Tensor,
    attention: torch.Tensor,
    out_size: int,
    dense: float = 4.0,
    iters: int = 5,
    power: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Resample square `images` (n, C, S, S) by `attention` (n, h, w) to (n, C, out, out).

    Attended rows and columns get more output pixels (up to about `dense` times a plain resize);
    uniform or all-zero attention gives exactly a bilinear align-corners resize. `power` raises
    the upsampled map to that power first (TASN's structure map is squared). `impl`: "auto"
    (fused kernel for CUDA tensors when it is built, else this reference), "reference", "fused".
    """
    if _resolve_impl(impl, images) == "fused":
        _check(images, attention, out_size, dense, iters)
        return torch.ops.tasn.attention_sample(
            images, attention.detach(), int(out_size), float(dense), int(iters), float(power)
        )
    return reference_attention_sample(images, attention, out_size, dense, iters, power)
