"""The vectorised sampler against a slow loop written straight from docs/method.md, and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tasn.model.sampler import attention_sample, sampler_coordinates, sampling_grid


# ---------------------------------------------------------------------------------------------
# The oracle: "The sampler, exactly", one sample and one pixel at a time, plain Python floats
# (float64). Nothing here is shared with tasn.model.sampler.
# ---------------------------------------------------------------------------------------------
def _upsample_align_corners(a: list[list[float]], size: int) -> list[list[float]]:
    h, w = len(a), len(a[0])
    out = [[0.0] * size for _ in range(size)]
    for i in range(size):
        y = i * (h - 1) / (size - 1) if h > 1 else 0.0
        y0 = min(int(math.floor(y)), h - 1)
        y1 = min(y0 + 1, h - 1)
        fy = y - y0
        for j in range(size):
            x = j * (w - 1) / (size - 1) if w > 1 else 0.0
            x0 = min(int(math.floor(x)), w - 1)
            x1 = min(x0 + 1, w - 1)
            fx = x - x0
            top = a[y0][x0] * (1 - fx) + a[y0][x1] * fx
            bottom = a[y1][x0] * (1 - fx) + a[y1][x1] * fx
            out[i][j] = max(0.0, top * (1 - fy) + bottom * fy)
    return out


def _normalise(p: list[float]) -> list[float]:
    s = sum(p)
    if not (math.isfinite(s) and s > 0):
        return [1.0 / len(p)] * len(p)
    return [v / s for v in p]


def _invert(d: list[float], out: int) -> list[float]:
    size = len(d)
    c = [0.0] * size
    for k in range(1, size):
        c[k] = c[k - 1] + (d[k - 1] + d[k]) / 2
    coords = []
    for o in range(out):
        u = o / (out - 1) * c[size - 1]
        if u == 0:
            p = 0.0
        else:
            k = next(k for k in range(1, size) if c[k] >= u)
            p = (k - 1) + (u - c[k - 1]) / (c[k] - c[k - 1])
        coords.append(2 * p / (size - 1) - 1)
    return coords


def loop_densities(att: list[list[float]], size: int, out: int, dense: float, iters: int, power: float = 1.0):
    """Steps 1-3: (dy, dx, [the clip level m of each iteration before the cap])."""
    a = _upsample_align_corners(att, size)
    py = _normalise([max(a[i][j] for j in range(size)) ** power for i in range(size)])
    px = _normalise([max(a[i][j] for i in range(size)) ** power for j in range(size)])
    dy = [v * out for v in py]
    dx = [v * out for v in px]
    cap = dense * out / size
    levels = []
    for t in range(iters):
        m = min(max(dy), max(dx))
        levels.append(m)
        if t == 0:
            m = min(m, cap)
        dy = [min(v, m) for v in dy]
        dx = [min(v, m) for v in dx]
        ry, rx = (out - sum(dy)) / size, (out - sum(dx)) / size
        dy = [v + ry for v in dy]
        dx = [v + rx for v in dx]
    return dy, dx, levels


def loop_coordinates(att: list[list[float]], size: int, out: int, dense: float, iters: int, power: float = 1.0):
    dy, dx, _ = loop_densities(att, size, out, dense, iters, power)
    return _invert(dy, out), _invert(dx, out)


def loop_sample(image: list, att, size: int, out: int, dense: float, iters: int, power: float = 1.0):
    """image: [C][S][S] floats; bilinear align-corners gather at (x = gx[q], y = gy[r])."""
    gy, gx = loop_coordinates(att, size, out, dense, iters, power)
    result = []
    for channel in image:
        plane = []
        for r in range(out):
            y = (gy[r] + 1) / 2 * (size - 1)
            y0 = min(int(math.floor(y)), size - 1)
            y1 = min(y0 + 1, size - 1)
            fy = y - y0
            row = []
            for q in range(out):
                x = (gx[q] + 1) / 2 * (size - 1)
                x0 = min(int(math.floor(x)), size - 1)
                x1 = min(x0 + 1, size - 1)
                fx = x - x0
                top = channel[y0][x0] * (1 - fx) + channel[y0][x1] * fx
                bottom = channel[y1][x0] * (1 - fx) + channel[y1][x1] * fx
                row.append(top * (1 - fy) + bottom * fy)
            plane.append(row)
        result.append(plane)
    return result


def peaked_map(n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blobs at random places: the kind of map TASN produces."""
    ys = torch.arange(h).view(1, h, 1).float()
    xs = torch.arange(w).view(1, 1, w).float()
    cy = torch.rand(n, 1, 1, generator=generator) * (h - 1)
    cx = torch.rand(n, 1, 1, generator=generator) * (w - 1)
    sigma = 0.5 + torch.rand(n, 1, 1, generator=generator) * 2
    return torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,size,out,h,w,dense,iters,power",
    [
        (3, 37, 17, 5, 7, 4.0, 5, 1.0),
        (2, 64, 28, 7, 7, 4.0, 5, 2.0),
        (2, 23, 23, 4, 9, 2.5, 3, 1.0),  # out == S
        (1, 50, 9, 1, 1, 4.0, 1, 1.0),  # 1x1 map: uniform
    ],
)
def test_vectorised_sampler_matches_slow_loop(n, size, out, h, w, dense, iters, power):
    g = torch.Generator().manual_seed(1234 + size)
    images = torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)
    att = torch.rand(n, h, w, generator=g, dtype=torch.float64) ** 4  # uneven, with peaks
    got = attention_sample(images, att, out, dense=dense, iters=iters, power=power)
    assert got.shape == (n, 3, out, out)
    for i in range(n):
        want = torch.tensor(loop_sample(images[i].tolist(), att[i].tolist(), size, out, dense, iters, power),
                            dtype=torch.float64)
        torch.testing.assert_close(got[i], want, atol=1e-9, rtol=0)


def test_the_dense_cap_applies_at_t0_only():
    """Maps peaked enough that the densities are still above the cap after the first spread: a cap
    applied again at t >= 1 would clip them, the definition does not."""
    size, out, dense, iters = 40, 24, 2.0, 4
    g = torch.Generator().manual_seed(21)
    att = torch.full((2, 6, 6), 0.02, dtype=torch.float64)
    att[0, 2, 3] = att[1, 4, 1] = 1.0  # one hot cell each
    att[1, 0, 5] = 0.7
    images = torch.rand(2, 3, size, size, generator=g, dtype=torch.float64)
    got = attention_sample(images, att, out, dense=dense, iters=iters)
    cap = dense * out / size
    for i in range(2):
        levels = loop_densities(att[i].tolist(), size, out, dense, iters)[2]
        assert levels[0] > cap and min(levels[1:]) > cap  # the cap binds at t = 0, and would again after
        want = torch.tensor(loop_sample(images[i].tolist(), att[i].tolist(), size, out, dense, iters),
                            dtype=torch.float64)
        torch.testing.assert_close(got[i], want, atol=1e-9, rtol=0)


def test_float32_matches_definition_within_rounding():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 48, 48, generator=g)
    att = peaked_map(2, 6, 6, g)
    got = attention_sample(images, att, 20)
    for i in range(2):
        want = torch.tensor(
            loop_sample(images[i].double().tolist(), att[i].double().tolist(), 48, 20, 4.0, 5), dtype=torch.float64
        )
        torch.testing.assert_close(got[i].double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 3e-5)])
@pytest.mark.parametrize("kind", ["uniform", "zeros", "nan"])
def test_uniform_or_degenerate_attention_is_a_plain_resize(kind, dtype, atol):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 61, 61, generator=g, dtype=dtype)
    make = {"uniform": torch.ones, "zeros": torch.zeros}
    att = make[kind](2, 7, 7, dtype=dtype) if kind in make else torch.full((2, 7, 7), float("nan"), dtype=dtype)
    got = attention_sample(images, att, 29)
    want = F.interpolate(images, size=(29, 29), mode="bilinear", align_corners=True)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_coordinates_non_decreasing_span_the_image_and_stay_in_range():
    g = torch.Generator().manual_seed(3)
    att = peaked_map(8, 14, 14, g)
    gy, gx = sampler_coordinates(att, 128, 56)
    for coords in (gy, gx):
        assert torch.all(coords[:, 1:] - coords[:, :-1] >= 0)
        torch.testing.assert_close(coords[:, 0], torch.full((8,), -1.0))
        torch.testing.assert_close(coords[:, -1], torch.full((8,), 1.0))


@pytest.mark.parametrize("dense", [2.0, 4.0])
def test_magnification_is_bounded_on_peaked_maps(dense):
    """Local magnification (output pixels per input pixel) over that of a plain resize.

    The cap is `dense` x the plain share at t = 0; the spread then returns the clipped mass
    uniformly, which adds at most one more plain share (out / S) to each pixel. So the bound that
    the definition guarantees is dense + 1 (docs/method.md's "up to dense times" counts the cap alone).
    We also check the peak really is magnified well beyond a plain resize.
    """
    size, out = 256, 64
    g = torch.Generator().manual_seed(11)
    att = peaked_map(16, 14, 14, g) ** 4
    gy, gx = sampler_coordinates(att, size, out, dense=dense)
    plain = (out - 1) / (size - 1)
    for coords in (gy, gx):
        p = (coords.double() + 1) / 2 * (size - 1)  # input position of each output pixel
        spacing = p[:, 1:] - p[:, :-1]
        magnification = (1.0 / spacing.clamp_min(1e-12)) / plain
        assert magnification.max() <= dense + 1 + 1e-3
        assert magnification.amax(dim=1).min() >= 0.9 * dense


def test_power_two_equals_squaring_the_upsampled_map():
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 40, 40, generator=g)
    att = peaked_map(2, 5, 5, g)
    up = F.interpolate(att.unsqueeze(1), size=(40, 40), mode="bilinear", align_corners=True).squeeze(1)
    torch.testing.assert_close(attention_sample(images, att, 16, power=2.0), attention_sample(images, up**2, 16))


def test_grid_layout_and_gradients():
    g = torch.Generator().manual_seed(2)
    att = peaked_map(2, 6, 6, g).requires_grad_(True)
    grid = sampling_grid(att, 30, 12)
    assert grid.shape == (2, 12, 12, 2)
    assert torch.all(grid[:, 0, :, 0] == grid[:, 5, :, 0])  # x varies along columns only
    assert torch.all(grid[:, :, 0, 1] == grid[:, :, 7, 1])  # y varies along rows only
    images = torch.rand(2, 3, 30, 30, generator=g, requires_grad=True)
    attention_sample(images, att, 12).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert att.grad is None  # no gradient into the attention


def test_low_precision_images_keep_their_dtype_and_values():
    g = torch.Generator().manual_seed(9)
    images = torch.rand(2, 3, 32, 32, generator=g)
    att = peaked_map(2, 4, 4, g)
    ref = attention_sample(images, att, 16)
    got = attention_sample(images.bfloat16(), att, 16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    "images,att,out,dense,match",
    [
        (torch.rand(1, 3, 8, 9), torch.rand(1, 2, 2), 4, 4.0, "square"),
        (torch.rand(2, 3, 8, 8), torch.rand(3, 2, 2), 4, 4.0, "batch sizes differ"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 2, 2), 1, 4.0, "out_size must be >= 2"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 2, 2), 4, 0.0, "dense must be > 0"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 1, 2, 2), 4, 4.0, r"attention must be \(n, h, w\)"),
        (torch.rand(3, 8, 8), torch.rand(1, 2, 2), 4, 4.0, r"images must be \(n, C, S, S\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(images, att, out, dense, match):
    with pytest.raises(ValueError, match=match):
        attention_sample(images, att, out, dense=dense)


def test_forcing_the_fused_sampler_on_cpu_is_an_error():
    with pytest.raises(ValueError, match="needs CUDA"):
        attention_sample(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 2), 4, impl="fused")
